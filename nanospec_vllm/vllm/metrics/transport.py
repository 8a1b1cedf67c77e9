"""How NanoSpec statistics travel from the engine core to the front end (both processes import this).

A payload is the dict :meth:`.worker.StepStats.drain` returns. It travels in a field of NanoSpec's own,
``SchedulerStats.nanospec_stats`` (:data:`STATS_FIELD`), which the ``SchedulerStats.nanospec_stats`` patch
adds to vLLM's dataclass in every process that loads the plugin. vLLM's msgpack encoder serialises a dataclass's
declared fields only (an extra attribute would be dropped on the way), and its decoders learn the fields when
they are built; the plugin is loaded before the engine client builds its decoder. No vLLM code reads that field,
so no connector, logger or Prometheus collector can ever see (or be confused by) NanoSpec's payload.

The scheduler patch keeps payloads that arrive while no ``SchedulerStats`` is being sent and merges them
(:func:`merge_payloads`), then :func:`attach` puts the merged payload on the outgoing stats; the front-end patch
takes it off (:func:`take`) before vLLM's loggers run. Cost: a dict merge per step, a few attribute reads.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HOST_COUNTERS", "PATH_COUNTERS", "SIZE_BUCKETS", "STATS_FIELD", "attach", "merge_payloads", "take"]

#: The SchedulerStats field NanoSpec adds and owns (vLLM has no field of that name; the patch refuses to start
#: if a vLLM version ever adds one).
STATS_FIELD = "nanospec_stats"
SIZE_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192, 16384)

#: The worker's host-side per-step counters (:class:`.worker.StepStats`), summed when payloads merge: requests
#: that got no slot, draft calls handed to vLLM's head (parallel drafting, soft cap), NanoSpec rows planned for
#: drafting, those of them the break-even guard sent to the full head, guard
#: trips (a request going from the sparse to the full head), rows the sparse head scored (summed over draft
#: positions: the proof, per run and per rank, that NanoSpec drafted), and NanoSpec hooks vLLM called with no open
#: step (``before_propose`` / a draft position outside ``sample_tokens``: those drafts came from vLLM's head; 0
#: unless vLLM changed where it drafts), and the steps the sparse head took each path (``path_<path>`` for the
#: paths of :data:`nanospec_vllm.ops.cost.PATHS`: per-request gather, union, dense; chosen per step under
#: ``kernel: auto``)
PATH_COUNTERS = ("path_per_request", "path_union", "path_dense")
HOST_COUNTERS = ("no_slot", "fallback", "planned", "guarded", "guard_fires", "sparse_rows", "no_step", *PATH_COUNTERS)


def merge_payloads(payloads: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Merge queued payloads: counters and size observations add up, gauges keep the latest value."""
    payloads = [p for p in payloads if p]
    if not payloads:
        return None
    out = dict(payloads[-1])  # gauges: the latest wins
    out["sizes"] = [s for p in payloads for s in p.get("sizes", [])]
    for k in ("target", "covered", *HOST_COUNTERS):
        out[k] = sum(int(p.get(k, 0)) for p in payloads)
    return out


def attach(scheduler_stats: Any, payload: dict[str, Any] | None) -> None:
    """Put ``payload`` on ``scheduler_stats`` (engine core), merged with one already there."""
    if not payload:
        return
    prev = getattr(scheduler_stats, STATS_FIELD, None)
    setattr(scheduler_stats, STATS_FIELD, merge_payloads([prev, payload]) if prev else payload)


def take(scheduler_stats: Any) -> dict[str, Any] | None:
    """Remove and return the payload carried by ``scheduler_stats`` (front end); ``None`` when there is none."""
    payload = getattr(scheduler_stats, STATS_FIELD, None)
    if payload is not None:
        setattr(scheduler_stats, STATS_FIELD, None)
    return payload or None
