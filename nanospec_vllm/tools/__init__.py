"""Tooling around the plugin, never loaded by ``vllm serve``: model preparation (:mod:`.assets`), the demo
(:mod:`.demo`) and the benchmarks (:mod:`.bench`). The runtime is ``config``, ``state``, ``step``, ``ops`` and
``vllm/``; nothing there imports this package.
"""
