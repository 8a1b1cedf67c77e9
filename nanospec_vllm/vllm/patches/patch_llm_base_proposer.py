"""Patch on ``vllm.v1.spec_decode.llm_base_proposer.SpecDecodeBaseProposer._sample_draft_tokens``.

Why: it is the one call every draft position of ``draft_model`` / ``eagle`` / ``eagle3`` goes through (greedy and
probabilistic). The patch asks the runtime (:meth:`..runtime.NanoSpecRuntime.draft`: its :class:`..head.SparseDraftHead` over the step's frozen draft batch) for the draft; it answers ``None``
("not mine": no NanoSpec row, parallel drafting, ...) and then, as for engines without NanoSpec, the original runs. Cost: the sparse head instead of the
full ``[B, V]`` projection. The drafter's lm_head (often shared with the target) is only read.
Removal: when vLLM proposers accept a pluggable draft head.
"""

from __future__ import annotations

from typing import Any

from .base import Patch


def _make(orig: Any) -> Any:
    def _sample_draft_tokens(self: Any, hidden_states: Any, sampling_metadata: Any) -> Any:
        rt = getattr(self, "_nanospec_runtime", None)  # NanoSpec's own attribute: absent on plain engines
        res = None if rt is None else rt.draft(self, hidden_states, sampling_metadata)
        return orig(self, hidden_states, sampling_metadata) if res is None else res

    return _sample_draft_tokens


PATCHES = [
    Patch(
        target="vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer._sample_draft_tokens",
        why="draft over the per-request active vocabulary",
        removal="a pluggable draft head in vLLM proposers",
        make=_make,
        expect_params=("self", "hidden_states", "sampling_metadata"),
        plain="unchanged: a proposer without a NanoSpec runtime goes straight to vLLM's method",
    )
]
