"""An opt-in recorder of where each request's active-set ids come from (tests and debugging only).

Off unless ``NANOSPEC_DEBUG_RECORD=1`` is set in the worker's environment when the runtime is created; then
``NanoSpecRuntime.debug`` is a :class:`DebugRecorder`, otherwise ``None`` and each hook in the runtime costs one
``is not None`` test. When on, it syncs the host several times per step (it reads token ids and whole active sets
back): never enable it for a measurement.

What it records, per vLLM request id, attributing batch rows with vLLM's own ``input_batch.req_ids`` and logits
rows with vLLM's own ``SpecDecodeMetadata`` (not with NanoSpec's row -> slot plan or its logits arithmetic):

* ``seed``: the ids the runtime seeds a slot with at admission (prompt + stop ids, or prompt + output on resume);
* ``emitted``: the tokens the target sampled for the request this step (``-1`` = rejected, skipped);
* ``topk``: the target's top-k over every logits row of the request this step (a superset of the verified rows);
* ``draft``: the draft tokens proposed for the request this step (and, in order, ``drafts``: one list per drafting
  step, so two runs can be compared position by position);
* ``pinned``: the pool's pinned ids (once, shared by every request);

and ``active``: the union over the request's life of its active set, read from the pool at the start of each
drafting step and just before its slot is released. Read it with :meth:`DebugRecorder.state`
(``tests/e2e/engine_job.py`` fetches it through ``collective_rpc``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["ENV", "DebugRecorder"]

ENV = "NANOSPEC_DEBUG_RECORD"


def _ids(x: Any) -> list[int]:
    if isinstance(x, torch.Tensor):
        x = x.reshape(-1).tolist()
    out: list[int] = []
    for v in x:
        if isinstance(v, (list, tuple)):
            out += _ids(v)
        elif int(v) >= 0:
            out.append(int(v))
    return out


class DebugRecorder:
    """Per-request id sources and active sets of one runtime (see the module docstring)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.pinned: list[int] = _ids(pool._pinned_ids)
        self.sources: dict[str, dict[str, set[int]]] = {}
        self.active: dict[str, set[int]] = {}
        self.drafts: dict[str, list[list[int]]] = {}  # per request, each drafting step's draft ids in order
        self._rows: list[str] = []  # the req id of each batch row of the step being drafted

    @classmethod
    def from_env(cls, pool: Any) -> DebugRecorder | None:
        return cls(pool) if os.environ.get(ENV) == "1" else None

    # ---- hooks called by the runtime ----
    def add(self, req_id: Any, why: str, ids: Iterable[int] | torch.Tensor) -> None:
        self.sources.setdefault(str(req_id), {}).setdefault(why, set()).update(_ids(ids))

    def snapshot(self, req_ids: Iterable[Any]) -> None:
        for rid in req_ids:
            if rid in self.pool:
                self.active.setdefault(str(rid), set()).update(self.pool.active_list(rid))

    def before_propose(self, runner: Any, sampled: Any, spec_meta: Any, topk: torch.Tensor | None) -> None:
        """Start of ``before_propose`` (before the pool is updated for this step)."""
        num_reqs = runner.input_batch.num_reqs
        self._rows = [str(r) for r in runner.input_batch.req_ids[:num_reqs]]
        self.snapshot(self.pool.keys())
        rows = sampled.tolist() if isinstance(sampled, torch.Tensor) else list(sampled)
        for i, rid in enumerate(self._rows[: len(rows)]):
            self.add(rid, "emitted", rows[i])
        if topk is None:
            return
        top = topk.tolist()
        if spec_meta is None:  # one logits row per request
            for i, rid in enumerate(self._rows[: len(top)]):
                self.add(rid, "topk", top[i])
            return
        cu = [int(c) for c in spec_meta.cu_num_draft_tokens.tolist()]
        target = spec_meta.target_logits_indices.tolist()
        bonus = spec_meta.bonus_logits_indices.tolist()
        for i, rid in enumerate(self._rows):
            lo = cu[i - 1] if i else 0
            for r in [*target[lo: cu[i]], bonus[i]]:
                self.add(rid, "topk", top[r])

    def after_propose(self, draft_ids: Any) -> None:
        """Start of ``after_propose``: the step's drafts, row by row."""
        rows = draft_ids.tolist() if isinstance(draft_ids, torch.Tensor) else list(draft_ids or [])
        for i, rid in enumerate(self._rows[: len(rows)]):
            self.add(rid, "draft", rows[i])
            self.drafts.setdefault(rid, []).append([int(t) for t in rows[i]])

    # ---- reading ----
    def state(self) -> dict[str, Any]:
        """JSON-ready: ``{"pinned": [...], "sources": {req: {why: [...]}}, "active": {req: [...]},
        "drafts": {req: [[step's drafts], ...]}}``."""
        self.snapshot(self.pool.keys())
        return {"pinned": sorted(self.pinned),
                "sources": {r: {w: sorted(v) for w, v in d.items()} for r, d in self.sources.items()},
                "active": {r: sorted(v) for r, v in self.active.items()},
                "drafts": {r: [list(d) for d in v] for r, v in self.drafts.items()}}
