"""Front-end pieces of the plugin that need no model: the --speculative-config file type, the per-request switch
parser and its HTTP-400 error, and the CPU temperature-bug replacement. What the same patches leave unchanged for
engines without a `nanospec` block: tests/unit/test_patches_inert.py."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("vllm")

from nanospec_vllm.config import parse_switch, request_enabled
from nanospec_vllm.vllm.patches import apply_all
from nanospec_vllm.vllm.patches.patch_arg_utils import speculative_config_type
from nanospec_vllm.vllm.patches.patch_cpu_triton_utils import expand_kernel_impl_fixed


def test_speculative_config_accepts_json_and_nanospec_files(tmp_path):
    from vllm.engine.arg_utils import optional_type

    parse = speculative_config_type(optional_type(json.loads))  # vLLM's own type for the flag
    assert parse('{"method": "ngram"}') == {"method": "ngram"}
    y = tmp_path / "s.yaml"
    y.write_text("method: draft_model\nnum_speculative_tokens: 2\nnanospec:\n  capacity: 64\n")
    assert parse(str(y)) == {"method": "draft_model", "num_speculative_tokens": 2, "nanospec": {"capacity": 64}}
    j = tmp_path / "s.json"
    j.write_text(json.dumps({"method": "eagle", "nanospec": {}}))
    assert parse(str(j)) == {"method": "eagle", "nanospec": {}}
    j.write_text(json.dumps({"method": "eagle"}))
    with pytest.raises(argparse.ArgumentTypeError, match="read only when its config has a `nanospec` block"):
        parse(str(j))
    with pytest.raises(argparse.ArgumentTypeError, match="not found"):
        parse(str(tmp_path / "missing.yaml"))
    with pytest.raises(argparse.ArgumentTypeError, match="cannot be converted"):  # vLLM's own error
        parse("not json")


def test_cli_parser_takes_a_file(tmp_path):
    apply_all()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    y = tmp_path / "spec.yaml"
    y.write_text("method: draft_model\nmodel: /m\nnum_speculative_tokens: 3\nnanospec:\n  target_topk: 5\n")
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--speculative-config", str(y)])
    assert args.speculative_config["nanospec"] == {"target_topk": 5}


@pytest.mark.parametrize("v,want", [(True, True), (0, False), (1, True), ("off", False), ("TRUE", True), (1.0, True)])
def test_switch_values(v, want):
    assert parse_switch(v) is want


@pytest.mark.parametrize("v", ["maybe", 2, -1, [1], None, 0.5])
def test_switch_rejects(v):
    with pytest.raises(ValueError, match="nanospec must be 0 or 1"):
        parse_switch(v)


def test_sampling_params_bad_switch_is_validation_error(monkeypatch):
    from nanospec_vllm.vllm.patches.scope import ENGINE_ENV

    monkeypatch.setenv(ENGINE_ENV, "1")  # what create_speculative_config sets for a NanoSpec engine
    apply_all()
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    assert request_enabled(SamplingParams(extra_args={"nanospec": 0}), True) is False
    assert request_enabled(SamplingParams(), True) is True
    assert request_enabled(SamplingParams(extra_args={"other": 1}), False) is False
    with pytest.raises(VLLMValidationError) as e:
        SamplingParams(extra_args={"nanospec": "maybe"})
    assert e.value.parameter == "vllm_xargs.nanospec"


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_expand_fix(dtype):
    out = torch.full((6,), -7, dtype=dtype) if dtype != torch.float32 else torch.full((6,), float("nan"))
    inp = torch.tensor([7, 0, 13], dtype=dtype) if dtype != torch.float32 else torch.tensor([0.7, 0.0, 1.3])
    expand_kernel_impl_fixed(out, inp, torch.tensor([2, 5, 6]), 0, 1)
    want = [7, 7, 1, 1, 1, 13] if dtype != torch.float32 else [0.7, 0.7, 1.0, 1.0, 1.0, 1.3]
    assert torch.allclose(out.double(), torch.tensor(want, dtype=torch.float64))


def test_vllm_config_file_with_nested_speculative_config(tmp_path):
    """`vllm serve --config serve.yaml`: vLLM turns the nested block into JSON; the patched type parses it."""
    apply_all()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    y = tmp_path / "serve.yaml"
    y.write_text("max-model-len: 512\nspeculative-config:\n  method: draft_model\n  model: /m\n"
                 "  num_speculative_tokens: 2\n  nanospec:\n    capacity: 64\n")
    args = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--config", str(y)])
    assert args.speculative_config["nanospec"] == {"capacity": 64} and args.max_model_len == 512
