"""Bad NanoSpec settings fail at start-up in the front end, naming the key, before any engine process starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nanospec_vllm.config import NanoSpecConfigError

from .conftest import ROOT

pytestmark = pytest.mark.e2e


def _engine_config(model, spec):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), speculative_config=spec, enforce_eager=True,
                      max_model_len=512).create_engine_config()


def test_unknown_key_named(qwen05b):
    with pytest.raises(NanoSpecConfigError, match=r"nanospec\.capacty: unknown key"):
        _engine_config(qwen05b, {"method": "draft_model", "model": str(qwen05b), "num_speculative_tokens": 2,
                                 "nanospec": {"capacty": 64}})


def test_unsupported_method_named(qwen05b):
    with pytest.raises(NanoSpecConfigError, match="method 'ngram' is not supported"):
        _engine_config(qwen05b, {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3,
                                 "nanospec": {}})


def test_valid_block_reaches_additional_config(qwen05b):
    cfg = _engine_config(qwen05b, {"method": "draft_model", "model": str(qwen05b), "num_speculative_tokens": 2,
                                   "nanospec": {"capacity": 128, "full_policy": "fifo"}})
    block = cfg.additional_config["nanospec"]
    assert block["capacity"] == 128 and block["full_policy"] == "fifo"
    assert cfg.speculative_config.method == "draft_model"


def test_serve_exits_with_the_key_name(qwen05b, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"method: draft_model\nmodel: {qwen05b}\nnum_speculative_tokens: 2\nnanospec:\n"
                   "  full_policy: lru\n")
    p = subprocess.run([sys.executable, "-m", "nanospec_vllm.cli", "serve", str(qwen05b), "--speculative-config",
                        str(bad), "--port", "0"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       check=False)
    assert p.returncode != 0
    assert "nanospec.full_policy: must be one of: 'stop' or 'fifo'" in p.stdout + p.stderr


def test_hot_set_outside_the_target_vocabulary_named(qwen05b, tmp_path):
    hot = tmp_path / "llama3-hot.txt"
    hot.write_text("# made for a 256k vocabulary\n10\n200000\n")
    with pytest.raises(NanoSpecConfigError, match=r"llama3-hot.txt holds 1 ids outside the target vocabulary "
                                                  r"\[0, 151936\)"):
        _engine_config(qwen05b, {"method": "draft_model", "model": str(qwen05b), "num_speculative_tokens": 2,
                                 "nanospec": {"hot_set_path": str(hot)}})
