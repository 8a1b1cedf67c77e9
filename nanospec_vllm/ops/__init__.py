"""The sparse draft head: one interface, three implementations.

``sparse_head(hidden, weight, ids, counts, ...)`` scores each row's active ids against the lm_head and returns a
:class:`SparseHeadOutput`. Implementations (``impl``):

* ``torch``  -- :mod:`.reference` (pure PyTorch; also the test oracle);
* ``triton`` -- :mod:`.triton_kernels` (batched gather + dot + argmax in one kernel; CUDA, or CPU tensors
  under ``TRITON_INTERPRET=1`` for tests);
* ``native`` -- :mod:`.native` (C++ CPU extension from ``csrc/``, fused gather + dot + argmax over all cores);
* ``auto``   -- ``triton`` on CUDA, ``native`` on CPU when built (else ``torch``, with one warning);
* ``union``  -- :mod:`.union`: one gather of the union of the batch's sets and one fp32 GEMM, each row masked to
  its own set (a union larger than its fixed buffer is finished by the ``auto`` kernel on the device). A caller
  whose sets do not change between draft positions passes the same :class:`.union.UnionPlan` at each of them.

Which of per-request / union / dense is cheapest for a step's sizes: :mod:`.cost` (the ``kernel: auto`` choice of
the vLLM head).

``dense`` is a strategy, not a kernel: when ``B x C >= dense_fallback_ratio x V`` the full head is cheaper than
gathering rows, so the dense logits are computed in the weight's dtype (as vLLM's head does) and masked to the
active sets. The decision uses static shapes only (no host sync).

Every implementation returns the raw ``(scores [B, C], token_ids [B], best [B])``; :func:`sparse_head` applies the
one shared epilogue (:func:`.reference.select`: top-k, log-probabilities) to whichever ran. Semantics (ties,
padding, duplicates, ``row_index``) are defined in :mod:`.reference`. A vocab-parallel (tensor-parallel) head runs
the same kernels on each rank's shard and merges across ranks: :mod:`.tp`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .reference import RawHead, candidate_rows, raw_reference, select
from .union import UnionPlan, prepare_union, union_raw

__all__ = [
    "SparseHeadOutput",
    "UnionPlan",
    "available_impls",
    "check_shapes",
    "dense_masked_scores",
    "prepare_union",
    "resolve_impl",
    "row_index_from_d2t",
    "sparse_head",
]

logger = logging.getLogger(__name__)
_warned: set[str] = set()
#: How often ``auto`` could not use its first choice (exported as a metric by the vLLM integration).
fallback_counts: dict[str, int] = {}


@dataclass
class SparseHeadOutput:
    token_ids: torch.Tensor  # [B] int64, -1 where a row had no candidate
    scores: torch.Tensor  # [B] fp32 score of the chosen token
    topk_ids: torch.Tensor | None = None  # [B, k] int64, -1 padded
    topk_scores: torch.Tensor | None = None  # [B, k] fp32, -inf padded
    logprobs: torch.Tensor | None = None  # [B, vocab_size] fp32, -inf outside the active set
    impl: str = ""


def _warn_once(key: str, msg: str) -> None:
    fallback_counts[key] = fallback_counts.get(key, 0) + 1
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)


def available_impls(device: torch.device | str) -> list[str]:
    dev = torch.device(device)
    out = ["torch"]
    from . import native

    if dev.type == "cpu" and native.is_available():
        out.append("native")
    from . import triton_kernels

    if triton_kernels.is_available(dev):
        out.append("triton")
    return out


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """Map ``auto`` to a concrete implementation for ``device``; validate an explicit choice. ``union`` is kept
    as is (its overflow pass uses ``auto``'s kernel); so is ``dense`` (every step handed to vLLM's head: the sparse
    head never scores)."""
    dev = torch.device(device)
    if impl in ("union", "dense"):
        return impl
    avail = available_impls(dev)
    if impl == "auto":
        if dev.type == "cuda" and "triton" in avail:
            return "triton"
        if dev.type == "cpu":
            if "native" in avail:
                return "native"
            from . import native

            _warn_once(
                "native_unavailable",
                f"NanoSpec: native CPU kernel not built ({native.build_error()}); using the PyTorch head. "
                "Reinstall with a C++ compiler present (`pip install -e .`) to build it.",
            )
        return "torch"
    if impl not in ("torch", "triton", "native"):
        raise ValueError(f"unknown sparse head implementation {impl!r} (allowed: auto, torch, triton, native, "
                         "union)")
    if impl not in avail:
        raise RuntimeError(f"sparse head implementation {impl!r} is not available on {dev} (available: {avail})")
    return impl


def dense_masked_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    row_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Candidate scores ``[B, C]`` read from the full head's logits (computed in the weight's dtype)."""
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight).float()  # [B, Vw]
    rows, valid = candidate_rows(ids, counts, weight.shape[0], row_index)
    return logits.gather(1, rows).masked_fill(~valid, float("-inf"))


def use_dense(batch: int, width: int, vocab_rows: int, ratio: float) -> bool:
    return batch * width >= ratio * vocab_rows


def check_shapes(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``hidden [B, H]``, ``weight [V, H]``, ``ids [B, C]``, ``counts [B]``."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [B, H] and weight [V, H] expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if ids.dim() != 2 or ids.shape[0] != hidden.shape[0] or counts.shape != (hidden.shape[0],):
        raise ValueError(f"ids [B, C] and counts [B] expected for B={hidden.shape[0]}, got {tuple(ids.shape)}, "
                         f"{tuple(counts.shape)}")


def sparse_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    *,
    row_index: torch.Tensor | None = None,
    topk: int = 0,
    want_logprobs: bool = False,
    vocab_size: int | None = None,
    impl: str = "auto",
    dense_fallback_ratio: float | None = None,
    union_plan: UnionPlan | None = None,
) -> SparseHeadOutput:
    """Score the active ids of each row and pick the draft token(s).

    Args:
        hidden: ``[B, H]`` drafter hidden states.
        weight: ``[Vw, H]`` lm_head weight (bf16, fp16 or fp32), never modified.
        ids: ``[B, C]`` active target-vocabulary ids per row (int32/int64, ``-1`` padded).
        counts: ``[B]`` number of valid leading entries of ``ids`` per row.
        row_index: optional ``[V]`` int target-id -> weight-row map (``-1`` = absent).
        topk: also return the top-``k`` ids and scores.
        want_logprobs: also return log-probabilities over the active set, ``[B, vocab_size]``.
        impl: ``auto`` / ``torch`` / ``triton`` / ``native`` / ``union``.
        dense_fallback_ratio: use the dense-masked strategy when ``B * C >= ratio * Vw`` (None: never).
        union_plan: a :func:`.union.prepare_union` plan of these ``ids`` / ``counts`` / ``row_index`` (built once
            per step by the caller); given, the union path runs whatever ``impl`` says.
    """
    check_shapes(hidden, weight, ids, counts)
    if want_logprobs and vocab_size is None:
        vocab_size = row_index.shape[0] if row_index is not None else weight.shape[0]
    name, raw = _run(hidden, weight, ids, counts, row_index, impl, dense_fallback_ratio, union_plan)
    scores, tok, best = raw
    topk_ids = topk_scores = logprobs = None
    if topk > 0 or want_logprobs:  # the one shared epilogue
        _, _, topk_ids, topk_scores, logprobs = select(scores, ids, topk, want_logprobs, vocab_size)
    return SparseHeadOutput(tok, best, topk_ids, topk_scores, logprobs, impl=name)


def _run(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
         row_index: torch.Tensor | None, impl: str, dense_fallback_ratio: float | None,
         union_plan: UnionPlan | None = None) -> tuple[str, RawHead]:
    if dense_fallback_ratio is not None and use_dense(ids.shape[0], ids.shape[1], weight.shape[0],
                                                      dense_fallback_ratio):
        s = dense_masked_scores(hidden, weight, ids, counts, row_index)
        tok, best, *_ = select(s, ids)
        return "dense", (s, tok, best)
    name = resolve_impl(impl, hidden.device)
    if name == "union" or union_plan is not None:
        plan = union_plan if union_plan is not None else prepare_union(weight, ids, counts, row_index)
        over = resolve_impl("auto", hidden.device) if plan.may_overflow else "torch"
        return "union", union_raw(hidden, plan, weight, ids, counts, row_index, over)
    if name == "torch":
        return name, raw_reference(hidden, weight, ids, counts, row_index)
    if name == "native":
        from . import native

        return name, native.sparse_head_native(hidden, weight, ids, counts, row_index)
    from . import triton_kernels

    return name, triton_kernels.sparse_head_triton(hidden, weight, ids, counts, row_index)


def row_index_from_d2t(d2t: torch.Tensor, target_vocab_size: int) -> torch.Tensor:
    """EAGLE-3 reduced heads: ``target_id = draft_row + d2t[draft_row]``; returns ``[V]`` int32 target->row
    (``-1`` for target ids the draft head cannot produce)."""
    rows = torch.arange(d2t.shape[0], device=d2t.device)
    tgt = rows + d2t.long()
    if tgt.numel() and (int(tgt.min()) < 0 or int(tgt.max()) >= target_vocab_size):
        raise ValueError(f"d2t maps draft rows outside the target vocabulary [0, {target_vocab_size})")
    out = torch.full((target_vocab_size,), -1, dtype=torch.int32, device=d2t.device)
    out[tgt] = rows.to(torch.int32)
    return out
