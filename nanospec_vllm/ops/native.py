"""Native CPU sparse draft head: the C++ extension ``nanospec_vllm._C`` built from ``csrc/sparse_head.cpp``.

One call does the gather, the fp32-accumulated dot products (bf16/fp16/fp32 weight rows read in place, converted
in registers; AVX-512 / AVX2 / scalar chosen at run time) and the argmax (ties to the lowest id), with the valid
(row, candidate) pairs of the whole batch split over all of torch's intra-op threads. It returns the raw
``(scores, token_ids, best)``; the dispatcher applies the shared epilogue.

Cost: reads ``sum(counts) * H * itemsize`` bytes of weight; allocates only the ``[B, C]`` fp32 scores and a fp32
copy of ``hidden``. The extension is built by ``pip install -e . --no-build-isolation`` (``setup.py``); when it
is missing, :func:`build_error` says why and the ``auto`` dispatch falls back to PyTorch with one warning.
"""

from __future__ import annotations

import torch

from .reference import RawHead

__all__ = ["build_error", "is_available", "isa", "sparse_head_native"]

_ext = None
_error: str | None = None
#: Tests set this to pre-fill the kernel's outputs with NaN, so an output the kernel forgets to write fails.
poison_outputs = False


def _load():
    global _ext, _error
    if _ext is None and _error is None:
        try:
            from .. import _C  # type: ignore[attr-defined]

            _ext = _C
        except Exception as e:  # noqa: BLE001 - not built, or built against another torch: reported, not raised
            _error = f"{type(e).__name__}: {e}"
    return _ext


def is_available() -> bool:
    return _load() is not None


def build_error() -> str:
    """Why the extension cannot be used ("" when it can)."""
    _load()
    return _error or ""


def isa() -> str:
    """The dot-product kernel the extension picked for this CPU (``avx512``, ``avx2``, ``scalar``)."""
    ext = _load()
    return ext.isa() if ext is not None else ""


def sparse_head_native(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    row_index: torch.Tensor | None = None,
) -> RawHead:
    """Native sparse head: raw ``(scores, token_ids, best)``."""
    ext = _load()
    if ext is None:
        raise RuntimeError(f"nanospec native CPU kernel unavailable ({_error})")
    if weight.stride(1) != 1:
        raise ValueError("weight rows must be contiguous (weight.stride(1) == 1)")
    scores, tok, best = ext.sparse_head(hidden, weight, ids, counts, row_index, poison_outputs)
    return scores, tok, best
