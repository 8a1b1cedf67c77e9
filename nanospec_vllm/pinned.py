"""The ids every request's active set holds from admission (no vLLM imports): what a generation can need whatever
its set holds (EOS, pad, the chat template's markers), the configured ``always_active_ids`` and the hot set.

:func:`pinned_token_ids` reads a model config (``eos_token_id``) and a tokenizer (EOS / pad ids, special tokens
the chat template writes), both duck-typed; :func:`compose_pinned` merges the sources, keeps the ids inside the
vocabulary and, when they would not leave room in ``capacity``, keeps the lowest ``capacity // 2`` (start-up
never fails over pinned ids; the caller says so). Used by the worker runtime and by the benchmarks that replay it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["compose_pinned", "pinned_token_ids"]


def pinned_token_ids(hf_config: Any, tokenizer: Any | None) -> set[int]:
    """Ids a generation can actually need, always active: EOS ids (model config), the tokenizer's EOS / pad, and
    the special tokens that the chat template writes. Placeholder
    specials the template never emits (some tokenizers reserve thousands) are not pinned."""
    ids: set[int] = set()
    eos = getattr(hf_config, "eos_token_id", None)
    for x in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if isinstance(x, int):
            ids.add(x)
    if tokenizer is not None:
        for attr in ("eos_token_id", "pad_token_id"):
            v = getattr(tokenizer, attr, None)
            if isinstance(v, int):
                ids.add(v)
        template = getattr(tokenizer, "chat_template", None) or ""
        if isinstance(template, dict):
            template = " ".join(str(v) for v in template.values())
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        for i, tok in decoder.items():
            content = getattr(tok, "content", str(tok))
            if getattr(tok, "special", False) and content and content in template:
                ids.add(int(i))
    return ids


def compose_pinned(vocab_size: int, capacity: int, *sources: Iterable[int]) -> tuple[list[int], int]:
    """``(sorted pinned ids, how many were dropped to fit)``: the union of ``sources`` inside ``[0, vocab_size)``;
    when it fills ``capacity`` (no room would be left for the request's own ids) the lowest ``capacity // 2``."""
    ids = sorted({int(i) for src in sources for i in src if 0 <= int(i) < vocab_size})
    if len(ids) >= capacity:
        keep = ids[: capacity // 2]
        return keep, len(ids) - len(keep)
    return ids, 0
