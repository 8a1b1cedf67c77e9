"""Tooling around the plugin, never loaded by ``vllm serve``: model preparation (:mod:`.assets`), the demo
(:mod:`.demo`) and the benchmarks (:mod:`.bench`). The runtime is ``config``, ``state``, ``step``, ``ops`` and
``vllm/``; nothing there imports this package.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["configs_dir", "mem_available"]


def configs_dir() -> Path:
    """The shipped ``configs/`` folder (:func:`nanospec_vllm.config.configs_dir`, where the runtime's
    ``hot_set_path: auto`` looks too). Imported on call: ``nanospec bench kernels`` must import with torch alone."""
    from ..config import configs_dir as find

    return find()


def mem_available() -> int | None:
    """``MemAvailable`` (free + reclaimable page cache) from /proc/meminfo in bytes; None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
