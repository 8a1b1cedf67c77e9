"""Tooling around the plugin, never loaded by ``vllm serve``: model preparation (:mod:`.assets`), the demo
(:mod:`.demo`) and the benchmarks (:mod:`.bench`). The runtime is ``config``, ``state``, ``step``, ``ops`` and
``vllm/``; nothing there imports this package.
"""

from __future__ import annotations

from ..config import configs_dir  # lives in the core: the runtime's `hot_set_path: auto` looks there too

__all__ = ["configs_dir"]
