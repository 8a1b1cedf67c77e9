"""The sparse draft head over a vocab-parallel lm_head: each tensor-parallel rank scores the active ids of its own
shard, and the ranks agree on the draft token without any rank gathering the full vocabulary.

vLLM's ``ParallelLMHead`` gives rank ``r`` a contiguous block of rows: target ids ``[start, end)`` are its local
rows ``0 .. end - start - 1`` (the padding rows after them are never read). :func:`shard_row_index` turns that
range, composed with an optional global target -> head-row index (EAGLE-3 ``d2t``), into the ``row_index`` every
kernel already accepts (``-1`` = not on this rank), so each rank runs the unchanged single-device kernel over
the same ``[B, C]`` candidate ids and scores only the ones it holds.

Agreement (every rank holds the same ids, so candidate columns line up):

* greedy: each rank's best ``(score, id)`` pair is exchanged (``[B, 2]`` fp32 per rank, the layout of vLLM's own
  ``LogitsProcessor.get_top_tokens``) and :func:`merge_greedy` takes the highest score, ties to the lowest id,
  exactly the single-device rule;
* top-k / log-probabilities (probabilistic drafting): the ``[B, C]`` candidate scores are exchanged (``-inf``
  where a rank does not hold the id) and the element-wise max is the single-device score matrix, so every rank
  builds the same pruned distribution and, with the same generator state, samples the same token.

Collectives are passed in as ``all_gather(t) -> [R, *t.shape]`` (no vLLM import here); :func:`torch_all_gather`
adapts ``torch.distributed``. Cost per draft position: the local sparse head over the rank's share of the ids,
plus one all-gather of ``8 * B`` bytes (greedy) or ``4 * B * C`` bytes (probabilistic) per rank, instead of
vLLM's all-gather of ``B x V`` logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .reference import NEG_INF, select

if TYPE_CHECKING:
    from . import SparseHeadOutput
    from .union import UnionPlan

__all__ = [
    "AllGather",
    "VocabShard",
    "greedy_across_ranks",
    "merge_greedy",
    "merge_scores",
    "shard_row_index",
    "sparse_head_sharded",
    "torch_all_gather",
]

#: ``all_gather(t)`` returns ``[world_size, *t.shape]`` with rank ``r``'s tensor at index ``r``; every rank calls it.
AllGather = Callable[[torch.Tensor], torch.Tensor]

#: fp32 holds every integer below 2**24 exactly: the ids travel next to their scores in one fp32 tensor.
_MAX_EXACT_ID = 1 << 24


@dataclass(frozen=True)
class VocabShard:
    """The head rows one rank holds: global head rows ``[start, end)`` are local rows ``0 .. end - start - 1``."""

    start: int
    end: int
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if not (0 <= self.start <= self.end) or not (0 <= self.rank < self.world_size):
            raise ValueError(f"invalid vocab shard {self}")

    @property
    def num_rows(self) -> int:
        return self.end - self.start


def shard_row_index(vocab_size: int, shard: VocabShard, row_index: torch.Tensor | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """``[vocab_size]`` int32: target id -> local row of ``shard`` (``-1`` when another rank holds it).

    ``row_index`` is an optional global target id -> head row map (EAGLE-3 reduced heads, ``-1`` = absent); without
    it the head row of id ``t`` is ``t``. Built once per engine (``4 * vocab_size`` bytes)."""
    if vocab_size > _MAX_EXACT_ID:
        raise ValueError(f"vocab_size {vocab_size} > 2**24: ids could not travel next to their fp32 scores")
    if row_index is not None:
        if row_index.shape != (vocab_size,):
            raise ValueError(f"row_index must be [{vocab_size}], got {tuple(row_index.shape)}")
        glob = row_index.to(device=device or row_index.device, dtype=torch.int64)
    else:
        glob = torch.arange(vocab_size, dtype=torch.int64, device=device)
    mine = (glob >= shard.start) & (glob < shard.end)
    return torch.where(mine, glob - shard.start, torch.full_like(glob, -1)).to(torch.int32)


def merge_greedy(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank best pairs ``scores [R, B]`` fp32, ``ids [R, B]`` -> ``(token_ids [B] int64, scores [B] fp32)``.

    The highest score wins, ties to the lowest id (the single-device rule, whatever the rank order); ``-1`` /
    ``-inf`` where no rank had a candidate. Pure, deterministic, no host sync."""
    if scores.shape != ids.shape or scores.dim() != 2:
        raise ValueError(f"scores and ids must both be [R, B], got {tuple(scores.shape)}, {tuple(ids.shape)}")
    idl = ids.long()
    scores = scores.float().masked_fill(idl < 0, NEG_INF)
    best = scores.max(dim=0).values if scores.shape[0] else torch.full(scores.shape[1:], NEG_INF,
                                                                        device=scores.device)
    big = torch.iinfo(torch.int64).max
    is_best = (scores == best[None, :]) & (scores > NEG_INF)
    tok = torch.where(is_best, idl, torch.full_like(idl, big)).amin(dim=0) if scores.shape[0] else idl.new_full(
        best.shape, -1)
    found = best > NEG_INF
    return torch.where(found, tok, torch.full_like(tok, -1)), torch.where(found, best, torch.full_like(best, NEG_INF))


def merge_scores(gathered: torch.Tensor) -> torch.Tensor:
    """Per-rank candidate scores ``[R, B, C]`` (``-inf`` where a rank does not hold the id) -> ``[B, C]``."""
    return gathered.amax(dim=0)


def greedy_across_ranks(token_ids: torch.Tensor, scores: torch.Tensor,
                        all_gather: AllGather) -> tuple[torch.Tensor, torch.Tensor]:
    """Exchange this rank's best ``(score, id)`` per row (one all-gather of ``[B, 2]`` fp32) and merge them.
    Ids must be below 2**24 (checked once by :func:`shard_row_index`)."""
    pair = torch.stack([scores.float(), token_ids.float()], dim=-1)  # [B, 2]
    g = all_gather(pair)  # [R, B, 2]
    return merge_greedy(g[..., 0], g[..., 1].long())


def sparse_head_sharded(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    *,
    row_index: torch.Tensor,
    all_gather: AllGather,
    topk: int = 0,
    want_logprobs: bool = False,
    vocab_size: int | None = None,
    impl: str = "auto",
    dense_fallback_ratio: float | None = None,
    union_plan: UnionPlan | None = None,
) -> SparseHeadOutput:
    """:func:`..sparse_head` on one rank of a vocab-parallel head; every rank of the group must call it together.

    Args:
        weight: this rank's ``[rows, H]`` shard of the head.
        row_index: ``[V]`` target id -> local row (:func:`shard_row_index`); ``-1`` = held by another rank.
        all_gather: the group's collective (see :data:`AllGather`).
        union_plan: this rank's :func:`.union.prepare_union` plan (over its local rows), or None.
        others: as :func:`..sparse_head`.

    Returns the :class:`..SparseHeadOutput` the single-device head would return over the full vocabulary (same
    token, score, top-k and log-probabilities), identical on every rank."""
    from . import SparseHeadOutput, _run, check_shapes  # imported here: ops/__init__ imports nothing from tp

    check_shapes(hidden, weight, ids, counts)
    if want_logprobs and vocab_size is None:
        vocab_size = row_index.shape[0]
    name, (scores, tok, best) = _run(hidden, weight, ids, counts, row_index, impl, dense_fallback_ratio,
                                     union_plan)
    if topk > 0 or want_logprobs:  # the full candidate scores on every rank, then the one shared epilogue
        full = merge_scores(all_gather(scores.float()))
        tok, best, topk_ids, topk_scores, logprobs = select(full, ids, topk, want_logprobs, vocab_size)
        return SparseHeadOutput(tok, best, topk_ids, topk_scores, logprobs, impl=name)
    tok, best = greedy_across_ranks(tok, best, all_gather)
    return SparseHeadOutput(tok, best, impl=name)


def torch_all_gather(group: object | None = None) -> AllGather:
    """An :data:`AllGather` over a ``torch.distributed`` process group (default: the world)."""
    import torch.distributed as dist

    def gather(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, t, group=group)
        return torch.stack(out)

    return gather
