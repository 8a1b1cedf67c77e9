"""The per-step index arithmetic of NanoSpec, as small pure functions (no vLLM imports, no pool, no state).

Everything that decides *which ids join a request's set after a verification* and *which emitted tokens count
for coverage* lives here, so it is unit-tested against a plain-Python model (``tests/unit/test_step.py``). A
mistake here would not break losslessness (the target verifies every token); it would quietly cost acceptance.

Shapes (R = NanoSpec rows updated this step, W = max tokens emitted per row = K + 1, N = rows of the
verification logits, k = target top-k):

* ``sampled [R, W]``: tokens the target emitted for each row this step, ``-1`` after the first rejection;
* ``num_draft [R]``: drafts that were verified for each row (0 for a row in prefill or without drafts);
* ``starts [R]``: the first row of each request's positions in the verification logits;
* ``topk [N, k]``: the target's top-k ids at every logits row (taken before vLLM samples).

Logits layout (vLLM V1): with speculative metadata, request ``i`` owns ``num_draft[i] + 1`` consecutive logits
rows (its drafted positions, then the bonus position), so its first row is the exclusive cumulative sum of
``num_draft + 1`` over the batch; without it (no request had drafts), request ``i`` owns logits row ``i``.
Cost: a handful of small tensor ops on ``[R, W, k]``; no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["BatchPlan", "VerifiedUpdate", "logits_starts", "plan_batch", "prompt_rows", "verified_update"]


@dataclass(frozen=True)
class BatchPlan:
    """Which batch rows draft with the sparse head: ``slots[i]`` is row ``i``'s pool slot (``-1``: none).

    ``tracked_rows`` hold a slot (their sets are updated); of those, ``on_rows`` draft with the sparse head and
    ``guarded_rows`` with the full head (the break-even guard, :mod:`..guard`); ``off_rows`` are the rows that draft
    with the full head: no slot (switch off, no free slot) or guarded.
    """

    slots: tuple[int, ...]  # [B]
    on_rows: tuple[int, ...]
    off_rows: tuple[int, ...]
    guarded_rows: tuple[int, ...] = ()

    @property
    def batch_size(self) -> int:
        return len(self.slots)

    @property
    def tracked_rows(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.slots) if s >= 0)


def plan_batch(req_ids: Sequence[Hashable], slot_of: Callable[[Hashable], int | None],
               guarded: Sequence[bool] | None = None) -> BatchPlan:
    """Map the batch's rows (``req_ids`` in row order) to pool slots; ``guarded[slot]`` (host flags of the
    break-even guard, optional) sends a slot's row to the full head."""
    slots = tuple(-1 if (s := slot_of(r)) is None else int(s) for r in req_ids)
    g = tuple(i for i, s in enumerate(slots) if s >= 0 and guarded is not None and guarded[s])
    gs = set(g)
    return BatchPlan(slots, tuple(i for i, s in enumerate(slots) if s >= 0 and i not in gs),
                     tuple(i for i, s in enumerate(slots) if s < 0 or i in gs), g)


def logits_starts(num_draft_all: Sequence[int] | None, batch_size: int) -> list[int]:
    """First verification-logits row of every batch row (see the module docstring for the layout)."""
    if num_draft_all is None:
        return list(range(batch_size))
    out, acc = [], 0
    for n in num_draft_all:
        out.append(acc)
        acc += int(n) + 1
    return out


@dataclass
class VerifiedUpdate:
    new_ids: torch.Tensor  # [R, W + W * k] int64, -1 padded: emitted tokens, then top-1 per position, top-2, ...
    drafted: torch.Tensor  # [R, W] bool: emitted token at a drafted position (counts for coverage)


def verified_update(sampled: torch.Tensor, num_draft: torch.Tensor | None, starts: torch.Tensor,
                    topk: torch.Tensor | None) -> VerifiedUpdate:
    """Ids to add to each row's set after a verification, most useful first, and the coverage mask.

    A position ``j`` of a row is *verified* when the target emitted a token there (``sampled[r, j] >= 0``) and
    ``j <= num_draft[r]`` (the drafted positions and the bonus position); it is *drafted* when also
    ``j < num_draft[r]``. Without drafts (``num_draft`` None) only position 0 is verified and none is drafted.
    The order of ``new_ids`` matters when a set overflows (earlier candidates win): the tokens the target
    emitted, then the top-1 of every verified position, then the top-2, and so on.
    """
    s = sampled.long()  # [R, W]
    R, W = s.shape
    j = torch.arange(W, device=s.device)[None, :]  # [1, W]
    emitted = s >= 0
    if num_draft is None:
        verified = emitted & (j == 0)
        drafted = torch.zeros_like(emitted)
    else:
        nd = num_draft.to(s.device).long()[:, None]  # [R, 1]
        verified = emitted & (j <= nd)
        drafted = emitted & (j < nd)
    parts = [torch.where(verified, s, torch.full_like(s, -1))]
    if topk is not None and topk.shape[0] > 0 and topk.shape[1] > 0:
        rows = (starts.to(s.device).long()[:, None] + j).clamp(0, topk.shape[0] - 1)  # [R, W]
        t = topk.to(s.device).long()[rows]  # [R, W, k]
        t = torch.where(verified[:, :, None], t, torch.full_like(t, -1))
        parts.append(t.transpose(1, 2).reshape(R, -1))  # [R, k * W]: rank-major (all top-1 first)
    return VerifiedUpdate(new_ids=torch.cat(parts, dim=1), drafted=drafted)


def prompt_rows(chunk_start: int, chunk_end: int, num_prompt: int, num_computed: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of this step's hidden states (absolute, within ``[chunk_start, chunk_end)``) that are
    prompt positions whose target top-k ``prompt_topk`` adds.

    The step computes positions ``num_computed .. num_computed + (chunk_end - chunk_start) - 1`` of the request.
    Prompt positions among them are those ``< num_prompt``. The last prompt position is excluded only when this
    chunk reaches it: its logits are the verification logits of the first output token, whose top-k the
    verification update adds already. A non-final prefill chunk contributes all of its positions.
    """
    n = min(chunk_end - chunk_start, num_prompt - num_computed)
    if num_computed + (chunk_end - chunk_start) >= num_prompt:
        n -= 1  # the final prompt position belongs to the verification update
    n = max(0, n)
    return chunk_start, chunk_start + n
