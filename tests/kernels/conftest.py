"""Kernel tests run every implementation on CPU tensors: the Triton kernels under ``TRITON_INTERPRET=1``.

The variable is set here, at collection, before anything in this folder imports triton, unless a CUDA device
is present (then the compiled kernels are tested on it too). It must precede the first ``import triton`` of the
session (triton creates its own ``tl.sum`` / ``tl.max`` helpers in one mode at import); if a module collected
earlier already imported triton (e.g. through vllm), the Triton tests fail with that explanation instead of
running compiled kernels on CPU tensors. vLLM on CPU disables triton either way, so the variable leaking into the
rest of the session (and into engine subprocesses) changes nothing there.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLS = ["torch", "native", "triton"]


def require_impl(impl: str, device: str) -> None:
    from nanospec_vllm.ops import native, triton_kernels

    if impl == "native":
        if device != "cpu":
            pytest.skip("native is a CPU kernel")
        if not native.is_available():
            pytest.skip(f"native extension not built: {native.build_error()}")
    if impl == "triton" and not triton_kernels.is_available(device):
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            pytest.fail("triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1 (a module "
                        "collected earlier imports vllm or triton); run with TRITON_INTERPRET=1 in the environment")
        pytest.skip("triton unavailable (needs CUDA, or TRITON_INTERPRET=1 on CPU)")


def _poisoned(factory):
    def wrapper(*args, **kwargs):
        t = factory(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(0x5EED)  # a plausible-looking id nobody wrote
        return t

    return wrapper


@pytest.fixture
def poison(monkeypatch):
    """``torch.empty`` returns NaN / garbage-id tensors and the native kernel pre-fills its outputs the same way,
    so an output a kernel forgets to write fails the comparison instead of passing by luck."""
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    from nanospec_vllm.ops import native

    monkeypatch.setattr(native, "poison_outputs", True)
    yield
