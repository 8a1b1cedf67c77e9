"""Tooling around the plugin, never loaded by ``vllm serve``: model preparation (:mod:`.assets`), the demo
(:mod:`.demo`) and the benchmarks (:mod:`.bench`). The runtime is ``config``, ``state``, ``step``, ``ops`` and
``vllm/``; nothing there imports this package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["configs_dir"]


def configs_dir() -> Path:
    """The shipped ``configs/`` folder: ``$NANOSPEC_CONFIGS``, else the source checkout's (editable installs),
    else the copy a wheel installs under ``<prefix>/share/nanospec-vllm/configs`` (``setup.py`` data files)."""
    candidates = [os.environ.get("NANOSPEC_CONFIGS"), Path(__file__).resolve().parents[2] / "configs",
                  Path(sys.prefix) / "share" / "nanospec-vllm" / "configs"]
    for c in candidates:
        if c and (Path(c) / "nanospec.yaml").is_file():
            return Path(c)
    raise FileNotFoundError("nanospec configs/ not found (looked in: "
                            + ", ".join(str(c) for c in candidates if c) + "); set NANOSPEC_CONFIGS")
