"""Pure-PyTorch sparse draft head: the oracle every kernel is tested against, and the ``torch`` implementation.

Semantics shared by every implementation (see ``ops/__init__.py``):

* candidates of row ``b`` are ``ids[b, :counts[b]]`` (target-vocabulary ids; ``-1`` entries are skipped);
* the lm_head row of id ``t`` is ``row_index[t]`` when a target->draft index is given (EAGLE-3 ``d2t`` heads,
  vocab shards; ``-1`` = not in this head, skipped), else ``t`` itself (ids ``>= weight.shape[0]`` skipped);
* score = ``hidden[b] . weight[row]`` accumulated in fp32 from the stored (bf16/fp16/fp32) values;
* the greedy token is the highest score, ties to the lowest id; ``-1`` (score ``-inf``) for a row with no
  candidate; top-k is ordered by score then id, duplicates counted once, padded with ``-1`` / ``-inf``;
* log-probabilities are a log-softmax over the row's distinct candidates, laid out over ``vocab_size`` columns
  with ``-inf`` elsewhere.
"""

from __future__ import annotations

import torch

__all__ = ["NEG_INF", "RawHead", "candidate_rows", "raw_reference", "scores_reference", "select", "sparse_head_reference"]

NEG_INF = float("-inf")
#: What every implementation returns: ``(scores [B, C] fp32, token_ids [B] int64, best [B] fp32)``.
RawHead = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def candidate_rows(
    ids: torch.Tensor,
    counts: torch.Tensor,
    num_rows: int,
    row_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [B, C] int64 clamped to a valid row, valid [B, C] bool)`` for the candidate ids."""
    C = ids.shape[1]
    col = torch.arange(C, device=ids.device)
    idl = ids.long()
    valid = (col[None, :] < counts.long()[:, None]) & (idl >= 0)
    if row_index is not None:
        in_range = idl < row_index.shape[0]
        valid &= in_range
        rows = row_index.long()[idl.clamp(0, row_index.shape[0] - 1)]
    else:
        rows = idl
    valid &= (rows >= 0) & (rows < num_rows)
    return rows.clamp(0, num_rows - 1), valid


def scores_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    row_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 scores ``[B, C]``, ``-inf`` at invalid candidates."""
    rows, valid = candidate_rows(ids, counts, weight.shape[0], row_index)
    w = weight[rows].float()  # [B, C, H]
    s = torch.einsum("bh,bch->bc", hidden.float(), w)
    return s.masked_fill(~valid, NEG_INF)


def select(
    scores: torch.Tensor,
    ids: torch.Tensor,
    topk: int = 0,
    want_logprobs: bool = False,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """From candidate scores ``[B, C]`` (``-inf`` = invalid) to ``(token_ids, best_scores, topk_ids, topk_scores,
    logprobs)`` with the shared tie and padding rules. Shared by every implementation's epilogue."""
    B, C = scores.shape
    idl = ids.long()
    big = torch.iinfo(torch.int64).max
    best = scores.max(dim=1).values if C else torch.full((B,), NEG_INF, device=scores.device)
    is_best = (scores == best[:, None]) & (scores > NEG_INF)
    tok = torch.where(is_best, idl, torch.full_like(idl, big)).min(dim=1).values if C else torch.full(
        (B,), -1, dtype=torch.int64, device=scores.device)
    tok = torch.where(best > NEG_INF, tok, torch.full_like(tok, -1))
    topk_ids = topk_scores = logprobs = None
    if topk > 0:
        key = torch.where(scores > NEG_INF, idl, torch.full_like(idl, big))
        key_sorted, order = torch.sort(key, dim=1, stable=True)
        s_sorted = scores.gather(1, order)
        dup = torch.zeros_like(s_sorted, dtype=torch.bool)
        dup[:, 1:] = key_sorted[:, 1:] == key_sorted[:, :-1]
        s_sorted = s_sorted.masked_fill(dup, NEG_INF)
        s_desc, order2 = torch.sort(s_sorted, dim=1, descending=True, stable=True)
        ids_desc = key_sorted.gather(1, order2)
        k = min(topk, C)
        topk_scores = torch.full((B, topk), NEG_INF, device=scores.device)
        topk_ids = torch.full((B, topk), -1, dtype=torch.int64, device=scores.device)
        topk_scores[:, :k] = s_desc[:, :k]
        topk_ids[:, :k] = torch.where(s_desc[:, :k] > NEG_INF, ids_desc[:, :k], torch.full_like(ids_desc[:, :k], -1))
    if want_logprobs:
        if vocab_size is None:
            raise ValueError("vocab_size is required for log-probabilities")
        full = torch.full((B, vocab_size), NEG_INF, device=scores.device)
        col = idl.clamp(0, vocab_size - 1)
        vals = scores.masked_fill(idl >= vocab_size, NEG_INF)
        full.scatter_reduce_(1, col, vals, reduce="amax", include_self=True)  # duplicates written once
        logprobs = torch.log_softmax(full, dim=1)
        # rows with no candidate: all -inf (log_softmax would give NaN)
        logprobs = torch.where(torch.isnan(logprobs), torch.full_like(logprobs, NEG_INF), logprobs)
    return tok, torch.where(tok >= 0, best, torch.full_like(best, NEG_INF)), topk_ids, topk_scores, logprobs


def raw_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    row_index: torch.Tensor | None = None,
) -> RawHead:
    """The ``torch`` implementation: raw ``(scores, token_ids, best)`` like the kernels."""
    s = scores_reference(hidden, weight, ids, counts, row_index)
    tok, best, *_ = select(s, ids)
    return s, tok, best


def sparse_head_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    row_index: torch.Tensor | None = None,
    topk: int = 0,
    want_logprobs: bool = False,
    vocab_size: int | None = None,
):
    """Reference sparse head; returns what :func:`select` returns."""
    s = scores_reference(hidden, weight, ids, counts, row_index)
    return select(s, ids, topk, want_logprobs, vocab_size)
