"""Every patch leaves an engine without a `nanospec` block as vLLM made it, or its register entry says what it
changes and why it cannot be inert (``Patch.plain``, shown in the register's table).

Each wrapper is built around a recording stand-in for vLLM's original (``Patch.make``; nothing is installed) and
called the way vLLM calls it for a plain engine: it must call the original once, with the same arguments, outside
NanoSpec's step scope, and return its result, touching nothing else. The CLI and config patches are also compared
with vLLM's real originals over sample values. A patch that started acting on plain engines fails here.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace as NS
from typing import Any

import pytest

pytest.importorskip("vllm")

from nanospec_vllm.vllm.patches import all_patches
from nanospec_vllm.vllm.patches.base import Patch
from nanospec_vllm.vllm.patches.scope import ENGINE_ENV, in_nanospec_step, nanospec_step

PATCHES = {p.target: p for p in all_patches()}
R = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"


@pytest.fixture(autouse=True)
def _plain_process(monkeypatch):
    """A process that has configured no NanoSpec engine."""
    monkeypatch.delenv(ENGINE_ENV, raising=False)


def _plain_runner() -> NS:
    return NS(vllm_config=NS(additional_config=None), drafter=NS(model=None))


#: target -> (arguments vLLM passes for a plain engine, what vLLM's original returns)
CALLS: dict[str, Any] = {
    "vllm.engine.arg_utils:EngineArgs.create_speculative_config": lambda: (
        (NS(speculative_config={"method": "ngram", "model": "${HOME}/m", "num_speculative_tokens": 2},
            additional_config={"other": 1}, attention_config=None, watermark_config=None), "model_cfg", "par_cfg"),
        object()),
    "vllm.sampling_params:SamplingParams._verify_extra_args": lambda: (
        (NS(extra_args={"nanospec": "maybe"}),), None),
    "vllm.utils.cpu_triton_utils:_expand_kernel_impl": lambda: (("out", "in", "cu", 0, 1, None), None),
    "vllm.v1.sample.ops.topk_topp_sampler:apply_top_k_only": lambda: ((_empty(), "k"), object()),
    f"{R}._update_states": lambda: ((_plain_runner(), NS(finished_req_ids=set())), object()),
    f"{R}._sample": lambda: ((NS(), "logits", "meta"), object()),
    f"{R}.propose_draft_token_ids": lambda: ((NS(), *range(9)), object()),
    f"{R}.execute_model": lambda: ((NS(), "sched", None), _empty_output()),
    f"{R}.sample_tokens": lambda: ((NS(), "grammar"), object()),
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer._sample_draft_tokens": lambda: (
        (NS(), "hidden", "meta"), object()),
    "vllm.v1.core.sched.scheduler:Scheduler.update_from_output": lambda: (
        (_Scheduler(), "sched", NS(sampled_token_ids=[])), {0: NS(scheduler_stats=NS(num_running_reqs=1))}),
    "vllm.v1.metrics.loggers:StatLoggerManager.record": lambda: (
        (NS(), NS(num_running_reqs=1), "iteration", None, 0), None),
    "vllm.v1.metrics.loggers:StatLoggerManager.log": lambda: ((NS(),), None),
}


class _Scheduler:
    pass


def _empty() -> Any:
    import torch

    return torch.empty(0, 10)


def _empty_output() -> Any:
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

    return EMPTY_MODEL_RUNNER_OUTPUT


def _snapshot(x: Any) -> Any:
    return {k: _snapshot(v) for k, v in vars(x).items()} if hasattr(x, "__dict__") else repr(x)


@pytest.mark.parametrize("patch", list(PATCHES.values()), ids=lambda p: p.target)
def test_register_says_what_a_plain_engine_gets(patch: Patch):
    """Every entry says it; an entry that claims "unchanged" is checked below."""
    assert patch.plain, f"{patch.target}: say what an engine without a `nanospec` block gets (Patch.plain)"
    if patch.plain.startswith("unchanged"):
        assert patch.target in CALLS or patch.target == "vllm.engine.arg_utils:EngineArgs.add_cli_args", (
            f"{patch.target} claims to leave plain engines unchanged: add it to CALLS")
    else:
        assert patch.target not in CALLS


@pytest.mark.parametrize("target", list(CALLS), ids=str)
def test_wrapper_is_vllms_original_for_a_plain_engine(target: str, monkeypatch):
    from nanospec_vllm.vllm.metrics.frontend import FrontendMetrics
    from nanospec_vllm.vllm.patches import patch_metrics

    monkeypatch.setattr(FrontendMetrics, "_instance", None)  # no NanoSpec payload has arrived in this process

    def no_check() -> bool:
        raise AssertionError("the transport self-check ran for a plain engine")

    monkeypatch.setattr(patch_metrics, "transport_works", no_check)
    monkeypatch.setattr(patch_metrics, "_checked", False)
    args, result = CALLS[target]()
    before = [_snapshot(a) for a in args]
    env = dict(os.environ)
    calls: list[tuple[tuple, dict, bool]] = []

    def vllm_original(*a: Any, **k: Any) -> Any:
        calls.append((a, k, in_nanospec_step()))
        return result

    wrapper = PATCHES[target].make(vllm_original)
    fn = wrapper.__func__ if isinstance(wrapper, (staticmethod, classmethod)) else wrapper
    out = fn(*args)
    assert out is result, "the wrapper must return vLLM's result itself"
    assert len(calls) == 1 and calls[0][1] == {} and not calls[0][2], calls
    assert len(calls[0][0]) == len(args) and all(x is y for x, y in zip(calls[0][0], args)), "same arguments"
    after = [_snapshot(a) for a in args]
    if target == f"{R}._update_states":  # the runtime notes that it looked (one attribute), and nothing else
        assert after[0].pop("_nanospec_checked") == "True"
    assert after == before, "the wrapper changed vLLM's objects"
    assert dict(os.environ) == env
    if isinstance(result, dict):
        assert all(not hasattr(v.scheduler_stats, "nanospec_stats") for v in result.values())
    if target == f"{R}.execute_model":
        assert "nanospec_stats" not in vars(out)


def test_expand_kernel_fix_acts_only_in_a_nanospec_step():
    """The other half of the cpu_triton_utils entry: inside the scope the fix runs instead of vLLM's function."""
    import torch

    calls = []
    wrapper = PATCHES["vllm.utils.cpu_triton_utils:_expand_kernel_impl"].make(lambda *a: calls.append(a))
    out = torch.zeros(3, dtype=torch.int64)
    with nanospec_step():
        wrapper(out, torch.tensor([5, 0]), torch.tensor([1, 3]), 0, 7)
    assert calls == [] and out.tolist() == [5, 7, 7]


def _vllm_add_cli_args() -> Any:
    from vllm.engine.arg_utils import EngineArgs

    orig = vars(EngineArgs).get("_nanospec_orig_add_cli_args", vars(EngineArgs)["add_cli_args"])
    return orig.__func__ if isinstance(orig, staticmethod) else orig


def _parse(add_cli_args: Any, value: str) -> Any:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = add_cli_args(FlexibleArgumentParser())
    parser.error = lambda msg: (_ for _ in ()).throw(ValueError(msg))  # type: ignore[method-assign]
    try:
        return ("ok", parser.parse_args(["--speculative-config", value]).speculative_config)
    except ValueError:
        return ("refused",)


def test_cli_flag_is_vllms_for_every_value_without_a_nanospec_file(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("method: ngram\nnum_speculative_tokens: 2\n")
    plain_json = tmp_path / "plain.json"
    plain_json.write_text(json.dumps({"method": "ngram"}))
    nano = tmp_path / "nano.yaml"
    nano.write_text("method: ngram\nnanospec: {}\n")
    vllm_fn = _vllm_add_cli_args()
    patched = PATCHES["vllm.engine.arg_utils:EngineArgs.add_cli_args"].make(vllm_fn).__func__
    values = ['{"method": "ngram", "num_speculative_tokens": 2}', '{"model": "${HOME}/m"}', "None", "", "not json",
              "[1, 2]", str(plain), str(plain_json), str(tmp_path / "missing.yaml"), "~/nowhere.json"]
    for v in values:
        assert _parse(patched, v) == _parse(vllm_fn, v), v
    assert _parse(vllm_fn, str(nano)) == ("refused",)
    assert _parse(patched, str(nano)) == ("ok", {"method": "ngram", "nanospec": {}})


def test_speculative_config_without_nanospec_reaches_vllm_as_it_came(monkeypatch):
    """A plain dict (``${VAR}`` left alone), a string and None reach vLLM's method as given; nothing is marked."""
    from vllm.engine.arg_utils import EngineArgs

    patch = PATCHES["vllm.engine.arg_utils:EngineArgs.create_speculative_config"]
    seen = []
    wrapper = patch.make(lambda self, m, p: seen.append((self.speculative_config, self.additional_config)))
    for sc in ({"method": "ngram", "model": "${HOME}/m"}, '{"method": "ngram"}', "spec.yaml", None):
        args = NS(speculative_config=sc, additional_config=None, attention_config=None, watermark_config=None)
        wrapper(args, None, NS(tensor_parallel_size=1))
        assert seen[-1][0] is sc and seen[-1][1] is None
    assert ENGINE_ENV not in os.environ
    assert "speculative_config" in {f for f in EngineArgs.__dataclass_fields__}
