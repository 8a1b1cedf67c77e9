"""NanoSpec statistics: counted in the worker, carried to the front end, exported on ``/metrics`` and in the
periodic log line.

Path (no new transport; see ``docs/architecture.md``):

* worker: :class:`StepStats` accumulates per step (device counters, drained once per step into a small dict that
  rides on ``ModelRunnerOutput.nanospec_stats``);
* engine core: the scheduler patch moves pending payloads into ``SchedulerStats.ec_connector_stats
  ["__nanospec__"]`` (a dict field that survives vLLM's msgpack transport);
* front end: the ``StatLoggerManager.record`` patch pops the payload *before* vLLM's loggers see it and feeds
  :class:`FrontendMetrics` (prometheus_client objects in the default registry, names ``nanospec_*`` because vLLM
  unregisters every ``vllm:*`` collector when its Prometheus logger starts) and the log-line aggregate.

Metrics: ``nanospec_slots_in_use`` (gauge), ``nanospec_active_vocab_size`` (histogram of set sizes at draft time,
one observation per NanoSpec request per draft step), ``nanospec_target_tokens_total`` and
``nanospec_target_tokens_covered_total`` (tokens the target emitted at drafted positions, and how many were in
the active set when drafted), ``nanospec_ids_dropped_total`` (ids refused by a full set), and
``nanospec_fallbacks_total`` (draft calls that had to use the full head), and ``nanospec_kernel{impl}`` (1 for
the sparse head implementation in use: a CPU worker showing ``torch`` runs without the native kernel).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger("vllm.nanospec")

PAYLOAD_KEY = "__nanospec__"
SIZE_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192, 16384)


class StepStats:
    """Worker-side accumulator (one per runtime)."""

    def __init__(self, device: Any) -> None:
        import torch

        self._torch = torch
        self.device = device
        self.reset()
        self.no_slot = 0
        self.fallback = 0
        #: cumulative host-side totals since the engine started (benchmarks read them in-process)
        self.totals = {"target": 0, "covered": 0, "size_sum": 0, "size_n": 0, "fallback": 0, "no_slot": 0}

    def reset(self) -> None:
        t = self._torch
        self.target = t.zeros((), dtype=t.int64, device=self.device)
        self.covered = t.zeros((), dtype=t.int64, device=self.device)
        self.sizes: list[Any] = []

    def add_coverage(self, target: Any, covered: Any) -> None:
        self.target += target
        self.covered += covered

    def record_sizes(self, counts: Any) -> None:
        self.sizes.append(counts.detach().clone())

    def drain(self, pool: Any, impl: str = "") -> dict[str, Any]:
        """One host sync: turn the device counters into plain ints and start a new step."""
        t = self._torch
        sizes = t.cat([s.reshape(-1).long() for s in self.sizes]).tolist() if self.sizes else []
        target, covered = (int(x) for x in t.stack([self.target, self.covered]).tolist())
        dropped = int(pool.dropped.sum()) if pool.num_in_use else 0
        tot = self.totals
        tot["target"] += target
        tot["covered"] += covered
        tot["size_sum"] += sum(sizes)
        tot["size_n"] += len(sizes)
        tot["fallback"] += self.fallback
        tot["no_slot"] += self.no_slot
        out = {
            "slots_in_use": pool.num_in_use,
            "sizes": sizes,
            "target": target,
            "covered": covered,
            "dropped_live": dropped,
            "no_slot": self.no_slot,
            "fallback": self.fallback,
            "impl": impl,
        }
        self.no_slot = 0
        self.fallback = 0
        self.reset()
        return out


def merge_payloads(payloads: list[dict[str, Any]]) -> dict[str, Any] | None:
    payloads = [p for p in payloads if p]
    if not payloads:
        return None
    out = dict(payloads[-1])  # gauges: the latest wins
    out["sizes"] = [s for p in payloads for s in p.get("sizes", [])]
    for k in ("target", "covered", "no_slot", "fallback"):
        out[k] = sum(int(p.get(k, 0)) for p in payloads)
    return out


class FrontendMetrics:
    """prometheus_client objects + the aggregate behind the periodic log line (front-end process)."""

    _instance: FrontendMetrics | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.slots = Gauge("nanospec_slots_in_use", "NanoSpec active-vocabulary slots in use",
                           multiprocess_mode="mostrecent")
        self.sizes = Histogram("nanospec_active_vocab_size", "Active-vocabulary size per request at draft time",
                               buckets=SIZE_BUCKETS)
        self.target = Counter("nanospec_target_tokens", "Tokens the target emitted at drafted positions")
        self.covered = Counter("nanospec_target_tokens_covered",
                               "Tokens the target emitted at drafted positions that were in the active set")
        self.dropped = Gauge("nanospec_ids_dropped_live", "Ids refused by full sets, summed over live requests",
                             multiprocess_mode="mostrecent")
        self.fallbacks = Counter("nanospec_fallbacks", "Draft calls or requests that used the full head instead")
        self.kernel = Gauge("nanospec_kernel", "Sparse head implementation in use (1 = this impl)", ["impl"],
                            multiprocess_mode="mostrecent")
        # since the last log line
        self.win_sizes = 0
        self.win_n = 0
        self.win_target = 0
        self.win_covered = 0
        self.last_slots = 0

    @classmethod
    def get(cls) -> FrontendMetrics:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def observe(self, p: dict[str, Any]) -> None:
        self.slots.set(p.get("slots_in_use", 0))
        self.last_slots = p.get("slots_in_use", 0)
        for s in p.get("sizes", []):
            self.sizes.observe(s)
        self.target.inc(p.get("target", 0))
        self.covered.inc(p.get("covered", 0))
        self.dropped.set(p.get("dropped_live", 0))
        if p.get("impl"):
            self.kernel.labels(impl=p["impl"]).set(1)
        fb = p.get("fallback", 0) + p.get("no_slot", 0)
        if fb:
            self.fallbacks.inc(fb)
        self.win_sizes += sum(p.get("sizes", []))
        self.win_n += len(p.get("sizes", []))
        self.win_target += p.get("target", 0)
        self.win_covered += p.get("covered", 0)

    def log_line(self) -> str | None:
        if not self.win_n and not self.win_target:
            return None
        mean = self.win_sizes / self.win_n if self.win_n else 0.0
        cov = 100.0 * self.win_covered / self.win_target if self.win_target else float("nan")
        line = (f"NanoSpec metrics: mean active vocab {mean:.0f} ids, coverage {cov:.1f}% "
                f"({self.win_covered}/{self.win_target} target tokens at drafted positions), "
                f"slots in use {self.last_slots}")
        self.win_sizes = self.win_n = self.win_target = self.win_covered = 0
        return line
