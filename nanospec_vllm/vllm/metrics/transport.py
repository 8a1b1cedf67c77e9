"""How NanoSpec statistics travel from the engine core to the front end (both processes import this).

A payload is the dict :meth:`.worker.StepStats.drain` returns. The scheduler patch keeps payloads that arrive while
no ``SchedulerStats`` is being sent and merges them (:func:`merge_payloads`); the front-end patch pops the entry
``PAYLOAD_KEY`` before vLLM's own loggers read ``ec_connector_stats``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PAYLOAD_KEY", "SIZE_BUCKETS", "merge_payloads"]

PAYLOAD_KEY = "__nanospec__"
SIZE_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192, 16384)


def merge_payloads(payloads: list[dict[str, Any]]) -> dict[str, Any] | None:
    payloads = [p for p in payloads if p]
    if not payloads:
        return None
    out = dict(payloads[-1])  # gauges: the latest wins
    out["sizes"] = [s for p in payloads for s in p.get("sizes", [])]
    for k in ("target", "covered", "no_slot", "fallback"):
        out[k] = sum(int(p.get(k, 0)) for p in payloads)
    return out
