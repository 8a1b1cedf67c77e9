"""V2 model runner: an engine with a `nanospec` block that vLLM would run on its V2 runner (where NanoSpec does
nothing) is refused at start-up with the cause and the fix; otherwise V1 is selected. Checked against the
installed vLLM's own decision (``VllmConfig.use_v2_model_runner``), so a vLLM upgrade that adds a cause fails here.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace as NS

import pytest

pytest.importorskip("vllm")

from nanospec_vllm.config import NanoSpecConfigError
from nanospec_vllm.vllm.patches.patch_arg_utils import (
    V2_ENV,
    _make_create_speculative_config,
    v2_runner_cause,
)

SPEC = {"method": "draft_model", "model": "/nonexistent", "num_speculative_tokens": 2}


def _create(spec: dict, additional: dict | None = None, watermark: object = None, hisparse: object = None) -> list:
    """Run the patched ``EngineArgs.create_speculative_config`` on a stand-in; returns the calls that reached
    vLLM's original."""
    called = []
    wrapped = _make_create_speculative_config(lambda self, m, p: called.append(1) or NS(method=spec["method"]))
    args = NS(speculative_config=dict(spec), additional_config=additional, watermark_config=watermark,
              attention_config=NS(hisparse_config=hisparse))
    wrapped(args, NS(), NS(tensor_parallel_size=1))
    return called


def test_env_var_forcing_v2_is_refused_naming_it(monkeypatch) -> None:
    monkeypatch.setenv(V2_ENV, "1")
    with pytest.raises(NanoSpecConfigError, match=rf"{V2_ENV}=1 selects vLLM's V2 model runner.*Fix: unset {V2_ENV}"):
        _create(dict(SPEC, nanospec={}))
    # given as --additional-config '{"nanospec": {...}}' instead: refused the same way
    with pytest.raises(NanoSpecConfigError, match=V2_ENV):
        _create(SPEC, additional={"nanospec": {"capacity": 64}})
    # no nanospec block: not NanoSpec's business
    assert _create(SPEC) == [1]


def test_v1_is_selected_when_nothing_chose(monkeypatch) -> None:
    import os

    monkeypatch.delenv(V2_ENV, raising=False)
    assert _create(dict(SPEC, nanospec={})) == [1]
    assert os.environ[V2_ENV] == "0"
    monkeypatch.delenv(V2_ENV)
    assert _create(SPEC, additional={"nanospec": {}}) == [1]
    assert os.environ[V2_ENV] == "0", "the --additional-config route must select V1 too"
    monkeypatch.setenv(V2_ENV, "0")
    assert _create(dict(SPEC, nanospec={})) == [1]


@pytest.mark.parametrize(("what", "kw"), [("--watermark-config", {"watermark": {"algorithm": "x"}}),
                                          ("hisparse_config", {"hisparse": object()})])
def test_features_that_force_v2_are_refused(monkeypatch, what: str, kw: dict) -> None:
    monkeypatch.setenv(V2_ENV, "0")  # they force V2 even over the variable
    with pytest.raises(NanoSpecConfigError, match=rf"{what}.*forces vLLM's V2 model runner.*Fix: remove"):
        _create(dict(SPEC, nanospec={}), **kw)


@pytest.mark.parametrize(("env", "watermark", "hisparse"),
                         list(itertools.product([None, "0", "1"], [None, {"a": 1}], [None, object()])))
def test_cause_agrees_with_vllms_own_choice(monkeypatch, env: str | None, watermark: object,
                                            hisparse: object) -> None:
    """Where NanoSpec sees no cause (and sets the variable to 0 when unset), vLLM picks V1; where it sees one,
    vLLM picks V2 (or refuses V1 itself)."""
    from vllm.config import VllmConfig

    if env is None:
        monkeypatch.delenv(V2_ENV, raising=False)
    else:
        monkeypatch.setenv(V2_ENV, env)
    args = NS(watermark_config=watermark, attention_config=NS(hisparse_config=hisparse))
    cause = v2_runner_cause(args)
    if cause is None and env is None:
        monkeypatch.setenv(V2_ENV, "0")  # what require_v1_runner does
    fake = NS(attention_config=args.attention_config, watermark_config=watermark,
              _get_v2_model_runner_unsupported_features=list)
    try:
        v2 = VllmConfig.use_v2_model_runner.fget(fake)
    except ValueError:  # vLLM refuses V1 itself (HiSparse with the variable at 0)
        v2 = True
    assert v2 == (cause is not None)
