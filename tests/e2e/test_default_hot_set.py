"""The default ``hot_set_path: auto`` on the real Qwen2.5 tokenizer: the shipped Qwen2.5 hot set's tokenizer check
passes, so `nanospec: {}` pins its first 512 ids; a tokenizer of another family (SmolLM2's, when prepared) gets
none."""

from __future__ import annotations

from pathlib import Path

from nanospec_vllm.config import load_hot_set, parse_config, shipped_hot_set

ROOT = Path(__file__).resolve().parents[2]


def test_auto_resolves_to_the_qwen_hot_set_for_the_real_tokenizer(qwen05b) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen05b))
    qwen = ROOT / "configs" / "hot" / "qwen2.5-hot.txt"
    assert shipped_hot_set(tok) == str(qwen)
    ids = parse_config({}).hot_set(tok)
    assert ids == load_hot_set(str(qwen), 512) and len(ids) == 512
    # every hot id decodes to a real token of this tokenizer (no padding rows past 151,664)
    assert max(ids) < len(tok)
