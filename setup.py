"""Builds the optional native CPU kernel ``nanospec_vllm._C`` (csrc/). Metadata lives in pyproject.toml.

The extension needs torch and a C++ compiler at build time (``pip install -e . --no-deps --no-build-isolation``
so the installed torch is used). If either is missing, or the compile fails, the package still installs: a
warning is printed here, and at run time ``nanospec_vllm.ops.native.build_error()`` says why the ``auto`` head
fell back to PyTorch. ``NANOSPEC_NO_NATIVE=1`` skips the build; ``NANOSPEC_NATIVE_CFLAGS`` adds compiler flags
(the dot kernels pick AVX-512 / AVX2 at run time, so no ``-march`` is needed).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys

from setuptools import setup


def _warn(msg: str) -> None:
    print(f"WARNING (nanospec-vllm): {msg}; the native CPU kernel is not built, the PyTorch head will be used.",
          file=sys.stderr)


def _native() -> dict:
    if os.environ.get("NANOSPEC_NO_NATIVE", "") == "1":
        _warn("NANOSPEC_NO_NATIVE=1")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # noqa: BLE001 - torch absent or broken in the build environment
        _warn(f"torch is not importable at build time ({type(e).__name__}: {e})")
        return {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(shlex.split(cxx)[0]) is None:
        _warn(f"no C++ compiler found ({cxx!r})")
        return {}

    class OptionalBuildExt(BuildExtension):
        """Never fails the install: a failed compile becomes a warning."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - the install must not fail
                _warn(f"building the extension failed ({type(e).__name__}: {e})")

        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - the install must not fail
                _warn(f"building {ext.name} failed ({type(e).__name__}: {e})")

    cflags = ["-O3", "-fopenmp"] + shlex.split(os.environ.get("NANOSPEC_NATIVE_CFLAGS", ""))
    ext = CppExtension(
        "nanospec_vllm._C",
        ["csrc/sparse_head.cpp"],
        extra_compile_args={"cxx": cflags},
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt.with_options(use_ninja=False)}}


def _configs() -> list[tuple[str, list[str]]]:
    """configs/ travels with wheels too (found by ``nanospec_vllm.tools.configs_dir``)."""
    out = []
    for root, _, files in sorted(os.walk("configs")):
        keep = sorted(os.path.join(root, f) for f in files if f.endswith((".yaml", ".yml", ".json", ".txt")))
        if keep:
            out.append((os.path.join("share", "nanospec-vllm", root), keep))
    return out


setup(data_files=_configs(), **_native())
