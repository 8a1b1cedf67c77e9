"""Triton sparse draft head: gather the active lm_head rows, fp32 dot products, argmax -- in one batched kernel.

``sparse_head_triton(hidden, weight, ids, counts, row_index)`` returns the raw ``(scores [B, C], token_ids [B],
best [B])``; the dispatcher (:func:`nanospec_vllm.ops.sparse_head`) applies the shared epilogue (top-k,
log-probabilities) once for every implementation. Semantics are defined in :mod:`.reference`.

How it runs (two launches, static shapes, no host sync, CUDA-graph safe):

1. ``_scores_kernel``, grid ``(B, splits)``: program ``(b, s)`` owns the candidate columns
   ``[s * chunk, (s + 1) * chunk)`` of row ``b``. It reads ``counts[b]`` on the device and loops only over the
   valid columns, ``BLOCK_C`` candidates at a time: load the ids, map them through ``row_index`` (``-1`` = skip),
   gather ``BLOCK_C x BLOCK_H`` tiles of the stored (bf16/fp16/fp32) weight rows, accumulate ``row . hidden[b]``
   in fp32. It writes every column's fp32 score (``-inf`` for padding and skipped ids, also past ``counts[b]``)
   and its split's best ``(score, id)`` (ties to the lowest id).
2. ``_reduce_kernel``, grid ``(B,)``: best over the splits, ties to the lowest id; ``-1`` / ``-inf`` for a row
   with no candidate.

``splits`` depends on ``B``, ``C`` and the device only: a batch of
one still spreads its candidates over ~4 programs per SM.

Cost: reads ``sum(counts) * H * itemsize`` bytes of weight (e.g. 3,072 ids x 896 x bf16 = 5.5 MB, against 272 MB
for Qwen2.5-0.5B's full head) plus ``B * C * 4`` bytes of scores written; no weight copy, no extra buffer beyond
the ``[B, C]`` scores and ``[B, splits]`` partials.

Tested on CPU tensors under ``TRITON_INTERPRET=1`` (``tests/kernels``), where :func:`is_available` also answers
True; on CUDA it is the ``auto`` choice.
"""

from __future__ import annotations

import functools
import os

import torch

from .reference import RawHead

__all__ = ["default_config", "is_available", "sparse_head_triton"]

try:  # triton is optional (CPU-only installs may lack it)
    import triton
    import triton.language as tl

    _IMPORT_ERROR: str | None = None
except Exception as e:  # noqa: BLE001  # pragma: no cover - any import failure means "no triton"
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _interpreter_usable() -> bool:
    """The interpreter also needs triton.language's own ``@jit`` helpers (``tl.sum``, ``tl.max``) to have been
    created in interpreter mode, i.e. triton imported after ``TRITON_INTERPRET=1`` was set."""
    try:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(standard.sum, InterpretedFunction)
    except Exception:  # noqa: BLE001  # pragma: no cover - depends on the triton version
        return False


def is_available(device: torch.device | str) -> bool:
    """True on CUDA when triton imports; on CPU only under ``TRITON_INTERPRET=1`` (tests), set before triton was
    first imported."""
    if triton is None:
        return False
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available()
    return dev.type == "cpu" and _interpret() and _interpreter_usable()


if triton is not None:
    #: id key of "no candidate" (larger than any vocabulary id); ties resolve to the smallest key.
    _INT32_MAX = tl.constexpr(2**31 - 1)

    def _scores_kernel(
        hidden_ptr,
        weight_ptr,
        ids_ptr,
        counts_ptr,
        row_index_ptr,
        scores_ptr,
        part_score_ptr,
        part_id_ptr,
        H,
        C,
        Vw,
        V_INDEX,
        CHUNK,
        NUM_SPLITS,
        stride_hb,
        stride_wr,
        stride_ib,
        stride_sb,
        HAS_ROW_INDEX: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        b = tl.program_id(0)
        s = tl.program_id(1)
        count = tl.load(counts_ptr + b).to(tl.int32)
        count = tl.minimum(tl.maximum(count, 0), C)
        start = s * CHUNK
        end = tl.minimum(start + CHUNK, C)
        vend = tl.minimum(end, count)
        lanes = tl.arange(0, BLOCK_C)
        hoffs = tl.arange(0, BLOCK_H)
        # Lane-wise running best (score, id); reduced once at the end.
        best = tl.full([BLOCK_C], float("-inf"), tl.float32)
        best_id = tl.full([BLOCK_C], _INT32_MAX, tl.int64)
        hrow = hidden_ptr + b.to(tl.int64) * stride_hb
        for c0 in range(start, vend, BLOCK_C):
            cols = c0 + lanes
            cmask = cols < vend
            tid = tl.load(ids_ptr + b.to(tl.int64) * stride_ib + cols, mask=cmask, other=-1).to(tl.int64)
            valid = cmask & (tid >= 0)
            if HAS_ROW_INDEX:
                valid = valid & (tid < V_INDEX)
                row = tl.load(row_index_ptr + tid, mask=valid, other=-1).to(tl.int64)
            else:
                row = tid
            valid = valid & (row >= 0) & (row < Vw)
            row = tl.where(valid, row, 0)
            wrow = weight_ptr + row * stride_wr
            acc = tl.zeros([BLOCK_C, BLOCK_H], dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                hs = h0 + hoffs
                hm = hs < H
                hv = tl.load(hrow + hs, mask=hm, other=0.0).to(tl.float32)
                w = tl.load(wrow[:, None] + hs[None, :], mask=valid[:, None] & hm[None, :], other=0.0)
                acc += w.to(tl.float32) * hv[None, :]
            sc = tl.where(valid, tl.sum(acc, axis=1), float("-inf"))
            tl.store(scores_ptr + b.to(tl.int64) * stride_sb + cols, sc, mask=cols < end)
            key = tl.where(valid, tid, _INT32_MAX)
            better = (sc > best) | ((sc == best) & (key < best_id))
            best = tl.where(better, sc, best)
            best_id = tl.where(better, key, best_id)
        # Columns of this chunk past counts[b]: -inf (the loop above covered whole tiles up to vend).
        first_fill = start + ((tl.maximum(vend - start, 0) + BLOCK_C - 1) // BLOCK_C) * BLOCK_C
        for c0 in range(first_fill, end, BLOCK_C):
            cols = c0 + lanes
            tl.store(scores_ptr + b.to(tl.int64) * stride_sb + cols,
                     tl.full([BLOCK_C], float("-inf"), tl.float32), mask=cols < end)
        m = tl.max(best, axis=0)
        mid = tl.min(tl.where(best == m, best_id, _INT32_MAX), axis=0)
        tl.store(part_score_ptr + b * NUM_SPLITS + s, m)
        tl.store(part_id_ptr + b * NUM_SPLITS + s, mid)

    def _reduce_kernel(part_score_ptr, part_id_ptr, tok_ptr, best_ptr, NUM_SPLITS, BLOCK_S: tl.constexpr):
        b = tl.program_id(0)
        offs = tl.arange(0, BLOCK_S)
        msk = offs < NUM_SPLITS
        ps = tl.load(part_score_ptr + b * NUM_SPLITS + offs, mask=msk, other=float("-inf"))
        pid = tl.load(part_id_ptr + b * NUM_SPLITS + offs, mask=msk, other=_INT32_MAX)
        m = tl.max(ps, axis=0)
        mid = tl.min(tl.where(ps == m, pid, _INT32_MAX), axis=0)
        found = (m > float("-inf")) & (mid < _INT32_MAX)
        tl.store(tok_ptr + b, tl.where(found, mid, -1))
        tl.store(best_ptr + b, tl.where(found, m, float("-inf")))


@functools.cache
def _jitted(interpret: bool):
    """The kernels, jitted on first use and keyed by the flag: ``triton.jit`` reads ``TRITON_INTERPRET`` when it
    wraps a function, so importing this module early does not fix the mode (triton's own import still does, see
    :func:`_interpreter_usable`), and the sm_90 compile test can wrap the same functions for the real compiler."""
    del interpret  # the cache key
    return triton.jit(_scores_kernel), triton.jit(_reduce_kernel)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_config(batch: int, width: int, hidden_size: int, device: torch.device) -> tuple[int, int, int, int]:
    """``(BLOCK_C, BLOCK_H, splits, num_warps)`` for a launch; depends on static shapes and the device only."""
    if device.type == "cuda":
        block_c, block_h, num_warps = 16, 256, 4
        target_programs = 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:  # interpreter: few, large programs (each op is a numpy call)
        block_c, block_h, num_warps = 64, 512, 1
        target_programs = 4
    block_h = min(block_h, triton.next_power_of_2(max(hidden_size, 16)))
    tiles = max(1, triton.cdiv(width, block_c))
    splits = max(1, min(tiles, triton.cdiv(target_programs, max(batch, 1))))
    return block_c, block_h, splits, num_warps


def sparse_head_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    row_index: torch.Tensor | None = None,
    *,
    block_c: int | None = None,
    block_h: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
) -> RawHead:
    """Triton sparse head: raw ``(scores, token_ids, best)``. The keyword-only block sizes override
    :func:`default_config` (tests and the benchmark's sweep)."""
    if triton is None:
        raise RuntimeError(f"triton is not importable ({_IMPORT_ERROR})")
    B, C = ids.shape
    H = hidden.shape[1]
    dev = hidden.device
    if B == 0 or C == 0:  # nothing to launch
        return (torch.full((B, C), float("-inf"), dtype=torch.float32, device=dev),
                torch.full((B,), -1, dtype=torch.int64, device=dev),
                torch.full((B,), float("-inf"), dtype=torch.float32, device=dev))
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(1) != 1:
        raise ValueError("weight rows must be contiguous (weight.stride(1) == 1)")
    if ids.stride(1) != 1:
        ids = ids.contiguous()
    counts = counts.contiguous()
    bc, bh, splits, warps = default_config(B, C, H, dev)
    bc = block_c or bc
    bh = block_h or bh
    warps = num_warps or warps
    tiles = triton.cdiv(C, bc)
    splits = max(1, min(num_splits or splits, tiles))
    chunk = triton.cdiv(tiles, splits) * bc
    splits = triton.cdiv(C, chunk)
    scores = torch.empty((B, C), dtype=torch.float32, device=dev)
    part_score = torch.empty((B, splits), dtype=torch.float32, device=dev)
    part_id = torch.empty((B, splits), dtype=torch.int64, device=dev)
    has_ri = row_index is not None
    ri = row_index.contiguous() if has_ri else ids  # dummy pointer when absent (never read)
    scores_kernel, reduce_kernel = _jitted(_interpret())
    scores_kernel[(B, splits)](
        hidden, weight, ids, counts, ri, scores, part_score, part_id,
        H, C, weight.shape[0], ri.shape[0] if has_ri else 0, chunk, splits,
        hidden.stride(0), weight.stride(0), ids.stride(0), scores.stride(0),
        HAS_ROW_INDEX=has_ri, BLOCK_C=bc, BLOCK_H=bh, num_warps=warps, enable_fp_fusion=True,
    )
    tok = torch.empty((B,), dtype=torch.int64, device=dev)
    best = torch.empty((B,), dtype=torch.float32, device=dev)
    reduce_kernel[(B,)](part_score, part_id, tok, best, splits,
                         BLOCK_S=triton.next_power_of_2(splits), num_warps=1, enable_fp_fusion=True)
    return scores, tok, best
