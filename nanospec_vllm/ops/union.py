"""The union path of the sparse draft head: one gather of the batch's union of active ids, one dense GEMM.

The per-request kernels read ``sum(counts)`` head rows, one set at a time. The sets of one batch overlap (pinned
ids, hot set, chat-template and common tokens, the target's top-k), so their union ``U`` is smaller than the sum;
at large batches it is also far smaller than the head. The union path:

1. marks every valid candidate's head row in a ``[Vw + 1]`` bool map (one scatter; invalid candidates go to the
   spare last entry) and compacts the marked rows, in increasing order, into a FIXED-SIZE buffer of ``capacity``
   rows (``nonzero_static`` on CPU, a cumulative sum and one scatter elsewhere; never ``nonzero`` / ``unique``:
   static shapes, nothing read on the host); each candidate finds its column by binary search. The union's
   size stays on the device;
2. gathers those ``capacity`` rows once (``index_select``) and converts them to fp32 (:func:`prepare_union`);
3. per draft position, one GEMM ``hidden [B, H] x rows.T -> [B, capacity]`` in fp32, then each candidate reads its
   own column back (``gather``), which masks every row to its own set (:func:`union_raw`).

The result is the raw ``(scores [B, C], token_ids, best)`` of every other implementation, with the same fp32
scores (up to accumulation order), so :func:`.reference.select` is the unchanged epilogue. ``row_index`` (EAGLE-3
``d2t`` heads, vocab shards: :mod:`.tp`) is applied before the union is formed, so the union is over head rows.

Overflow: a union larger than ``capacity`` keeps its ``capacity`` lowest rows; the candidates whose row did not
fit are scored by the per-request kernel (``overflow_impl``) over those candidates only (the others are passed
as ``-1``, which the native and Triton kernels skip without reading a row) and merged with ``torch.where``: exact,
on the device, no host branch. The default ``capacity`` is ``min(Vw, B x C)``, which no union can exceed; the
overflow pass is then skipped (decided from shapes on the host).

Costs (``B`` rows, ``C`` columns, ``U`` = ``capacity``, ``H`` hidden, ``Vw`` head rows):
:func:`prepare_union` makes two passes over a ``Vw + 1``-byte map, a ``B x C x log2(U)`` search, reads ``U`` head rows
and writes ``U x H`` fp32 (``4 U H`` bytes, held by the plan; pass a ``workspace`` dict to reuse the buffers
across calls); :func:`union_raw` is one ``[B, H] x [H, U]`` fp32 GEMM plus ``[B, C]`` gathers. The plan depends
only on the sets, so a caller whose sets do not change between draft positions builds it once per step and
reuses it (:class:`..vllm.head.SparseDraftHead` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import NEG_INF, RawHead, candidate_rows, select

__all__ = ["UnionPlan", "default_capacity", "prepare_union", "union_raw", "union_size"]


@dataclass
class UnionPlan:
    """One batch's union, ready to be scored at any number of draft positions (all on the device)."""

    rows: torch.Tensor  # [capacity] int64 head rows of the union, increasing (0 past the union's end)
    size: torch.Tensor  # [] int64 number of distinct head rows among the valid candidates (may exceed capacity)
    col: torch.Tensor  # [B, C] int64 column of each candidate in ``rows`` (clamped to capacity - 1)
    valid: torch.Tensor  # [B, C] bool the candidate is scored (see reference.candidate_rows)
    fits: torch.Tensor  # [B, C] bool valid and inside the first ``capacity`` union rows
    weight_rows: torch.Tensor  # [capacity, H] fp32 copy of the union's head rows
    capacity: int
    may_overflow: bool  # host-known: capacity < min(Vw, B x C)


def default_capacity(batch: int, width: int, vocab_rows: int) -> int:
    """The largest union ``batch`` sets of ``width`` ids can have in a head of ``vocab_rows`` rows (>= 1)."""
    return max(1, min(vocab_rows, batch * width))


def _buffer(workspace: dict | None, key: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """A reusable buffer from ``workspace`` (allocated on first use for this shape), or a fresh one."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    t = workspace.get(key)
    if t is None or t.shape != shape or t.dtype != dtype or t.device != device:
        t = torch.empty(shape, dtype=dtype, device=device)
        workspace[key] = t
    return t


def _mark(rows: torch.Tensor, valid: torch.Tensor, vocab_rows: int, workspace: dict | None) -> torch.Tensor:
    """``[Vw + 1]`` bool: entry ``r`` is set when some valid candidate reads head row ``r`` (last entry: spare)."""
    mark = _buffer(workspace, "mark", (vocab_rows + 1,), torch.bool, rows.device)
    mark.zero_()
    target = torch.where(valid, rows, torch.full_like(rows, vocab_rows)).reshape(-1)
    mark.index_fill_(0, target, True)
    return mark


def union_size(ids: torch.Tensor, counts: torch.Tensor, vocab_rows: int,
               row_index: torch.Tensor | None = None, workspace: dict | None = None) -> torch.Tensor:
    """``[]`` int64 on the device: how many distinct head rows the batch's valid candidates read (no host sync).
    Cost: one ``[Vw + 1]`` bool map, one scatter of ``B x C``, one count."""
    rows, valid = candidate_rows(ids, counts, vocab_rows, row_index)
    return _mark(rows, valid, vocab_rows, workspace)[:vocab_rows].sum()


def prepare_union(weight: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                  row_index: torch.Tensor | None = None, capacity: int | None = None,
                  workspace: dict | None = None) -> UnionPlan:
    """Form the union of the batch's sets and gather its head rows once (fp32). See the module docstring.

    ``capacity``: rows the plan holds (default :func:`default_capacity`, which never overflows); a union larger
    than it is finished by the per-request kernel in :func:`union_raw`. ``workspace``: a dict the caller keeps to
    reuse the buffers between calls (the plan then aliases them: one plan per workspace at a time)."""
    Vw, H = weight.shape
    B, C = ids.shape
    dev = weight.device
    bound = default_capacity(B, C, Vw)
    cap = bound if capacity is None else max(1, min(int(capacity), bound))
    rows, valid = candidate_rows(ids, counts, Vw, row_index)
    mark = _mark(rows, valid, Vw, workspace)[:Vw]
    size = mark.sum()
    urows = _compact(mark, cap)  # [cap] increasing union rows, padded with Vw
    # each candidate's column: binary search of its row among the union's (padding Vw sorts last); a row that is
    # not among the first `cap` (overflow) finds another row there
    col = torch.searchsorted(urows, rows.reshape(-1)).reshape(B, C).clamp_(max=cap - 1)
    fits = valid & (urows.gather(0, col.reshape(-1)).reshape(B, C) == rows)
    urows = urows.clamp(max=Vw - 1) if Vw else urows
    gathered = _buffer(workspace, "gathered", (cap, H), weight.dtype, dev)
    torch.index_select(weight, 0, urows, out=gathered)
    if weight.dtype == torch.float32:
        weight_rows = gathered
    else:
        weight_rows = _buffer(workspace, "rows_f32", (cap, H), torch.float32, dev)
        weight_rows.copy_(gathered)
    return UnionPlan(urows, size, col, valid, fits, weight_rows, cap, cap < bound)


def _compact(mark: torch.Tensor, cap: int, scatter: bool | None = None) -> torch.Tensor:
    """The first ``cap`` set positions of ``mark [Vw]`` in increasing order, padded with ``Vw``: a static shape
    and no host read. ``nonzero_static`` on CPU; elsewhere (or ``scatter=True``) a cumulative sum and one
    scatter."""
    Vw = mark.shape[0]
    if not (mark.device.type != "cpu" if scatter is None else scatter):
        return torch.nonzero_static(mark, size=cap, fill_value=Vw).reshape(cap)
    pos = torch.cumsum(mark, 0, dtype=torch.int32)  # 1-based rank of each set position
    slot = torch.where(mark & (pos <= cap), pos.long() - 1, cap)
    out = torch.full((cap + 1,), Vw, dtype=torch.int64, device=mark.device)
    out.scatter_(0, slot, torch.arange(Vw, device=mark.device, dtype=torch.int64))
    return out[:cap]


def union_raw(hidden: torch.Tensor, plan: UnionPlan, weight: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
              row_index: torch.Tensor | None = None, overflow_impl: str = "torch") -> RawHead:
    """Raw ``(scores [B, C], token_ids [B], best [B])`` from a :class:`UnionPlan` of the same ``ids`` / ``counts``.

    One fp32 GEMM ``[B, H] x [H, capacity]`` and a per-row gather. When the plan may overflow, the candidates that
    did not fit are scored by ``overflow_impl`` (``torch`` / ``native`` / ``triton``) with the others passed as
    ``-1`` and merged on the device."""
    # [capacity, H] x [H, B]: the long dimension as the GEMM's rows (1.5x faster than the other form in one
    # measurement on this project's shared CPU); read back through the transposed view
    full = (plan.weight_rows @ hidden.float().T).T  # [B, capacity]
    s = full.gather(1, plan.col).masked_fill(~plan.fits, NEG_INF)
    if plan.may_overflow:
        rest = plan.valid & ~plan.fits
        ids_rest = torch.where(rest, ids, torch.full_like(ids, -1))
        s_rest = _per_request(overflow_impl, hidden, weight, ids_rest, counts, row_index)
        s = torch.where(rest, s_rest, s)
    tok, best, *_ = select(s, ids)
    return s, tok, best


def _per_request(impl: str, hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                 row_index: torch.Tensor | None) -> torch.Tensor:
    if impl == "native":
        from .native import sparse_head_native

        return sparse_head_native(hidden, weight, ids, counts, row_index)[0]
    if impl == "triton":
        from .triton_kernels import sparse_head_triton

        return sparse_head_triton(hidden, weight, ids, counts, row_index)[0]
    from .reference import scores_reference

    return scores_reference(hidden, weight, ids, counts, row_index)
