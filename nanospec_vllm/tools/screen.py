"""Low-rank screen over the whole vocabulary: cheap approximate head scores, to find ids the active set lacks.

A rank-``r`` factor of the drafter's lm_head ``W [V, d]`` (truncated SVD, training-free, computed once at load
time): ``W ~= A @ B.T`` with ``B [d, r]`` the top right singular vectors and ``A = W @ B [V, r]`` (the head's rows
projected on them). Approximate scores for every id are ``(h @ B) @ A.T``; :func:`screen_candidates` returns the
top ``m`` ids, which a caller scores EXACTLY (with the real head rows) next to the active set. They are not added
to the set.

Costs: building reads the head once and forms the ``d x d`` Gram matrix (``V d^2`` flops: 0.12 TFLOP for a
151,936 x 896 head, a few seconds on a CPU) plus one ``d x d`` symmetric eigendecomposition. Per draft token the
screen reads ``A`` (``V r`` values) and ``B`` (``d r``): for the 0.5B head in bf16, r=64 is 19.6 MB, 7.2% of the
272 MB full head, plus ``m`` exact rows (``m d`` values). Pure PyTorch; no vLLM imports.

Used only by the coverage replay (``nanospec bench coverage``, policies ``screen-R-M``): no shipped path drafts
with it, so it lives with the tools (``tests/kernels/test_screen.py``).
"""

from __future__ import annotations

import torch

__all__ = ["build_factor", "screen_bytes", "screen_candidates"]


def build_factor(weight: torch.Tensor, rank: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [V, r], B [d, r])`` with ``weight ~= A @ B.T`` (best rank-r approximation in Frobenius norm).

    ``B`` holds the top-``r`` eigenvectors of ``W.T @ W`` (computed in float64 for stability), ``A = W @ B``.
    ``dtype`` of the result defaults to ``weight``'s.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, d], got {tuple(weight.shape)}")
    _V, d = weight.shape
    if not 1 <= rank <= d:
        raise ValueError(f"rank must be in [1, {d}] (got {rank})")
    w = weight.double()
    gram = w.T @ w  # [d, d]
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    order = torch.argsort(evals, descending=True)[:rank]
    b = evecs[:, order]
    # deterministic sign: largest-magnitude entry of each vector positive
    sign = torch.sign(b.gather(0, b.abs().argmax(0, keepdim=True)))
    b = b * torch.where(sign == 0, torch.ones_like(sign), sign)
    a = w @ b
    out = dtype or weight.dtype
    return a.to(out), b.to(out)


def screen_candidates(hidden: torch.Tensor, factor: tuple[torch.Tensor, torch.Tensor], m: int) -> torch.Tensor:
    """``[B, m]`` int64 ids with the highest approximate scores ``(hidden @ B) @ A.T`` (ties: lowest id first)."""
    a, b = factor
    if hidden.dim() != 2 or hidden.shape[1] != b.shape[0]:
        raise ValueError(f"hidden must be [B, {b.shape[0]}], got {tuple(hidden.shape)}")
    m = min(m, a.shape[0])
    approx = (hidden.to(b.dtype) @ b) @ a.T  # [B, V]
    vals, idx = approx.float().topk(m, dim=1)
    # stable order: score desc, id asc (topk does not promise an order among equal scores)
    o = torch.argsort(idx, dim=1)
    idx, vals = idx.gather(1, o), vals.gather(1, o)
    o = torch.argsort(-vals, dim=1, stable=True)
    return idx.gather(1, o).long()


def screen_bytes(vocab_size: int, hidden_size: int, rank: int, m: int, elem_bytes: int = 2) -> int:
    """Bytes read per draft token: the factor (``(V + d) r``) plus ``m`` exact head rows (``m d``)."""
    return elem_bytes * ((vocab_size + hidden_size) * rank + m * hidden_size)
