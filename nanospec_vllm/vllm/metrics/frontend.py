"""Front-end side of the NanoSpec statistics: Prometheus objects and the periodic log line (API server process).

Metric names are ``nanospec_*`` because vLLM unregisters every ``vllm:*`` collector when its Prometheus logger
starts. Cost: a few counter updates per received payload.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .transport import PATH_COUNTERS, SIZE_BUCKETS

logger = logging.getLogger("vllm.nanospec")

__all__ = ["FrontendMetrics"]


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
        self.guarded = Counter("nanospec_guarded_drafts",
                               "Request draft steps the break-even guard sent to the full head (guard_coverage)")
        self.guard_fires = Counter("nanospec_guard_fires", "Times a request went from the sparse to the full head")
        self.sparse_rows = Counter("nanospec_sparse_rows",
                                   "Request rows the sparse head scored, summed over draft positions")
        self.paths = Counter("nanospec_head_path_steps", "Draft steps per sparse-head path (kernel: auto chooses "
                             "per step among per_request, union, dense)", ["path"])
        self.no_step = Counter("nanospec_hooks_outside_step",
                               "NanoSpec draft hooks vLLM called outside sample_tokens (drafted by vLLM's head)")
        self.kernel = Gauge("nanospec_kernel", "Sparse head implementation in use (1 = this impl)", ["impl"],
                            multiprocess_mode="mostrecent")
        # since the last log line
        self.win_sizes = 0
        self.win_n = 0
        self.win_target = 0
        self.win_covered = 0
        self.last_slots = 0
        self.win_planned = 0
        self.win_guarded = 0

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
        if p.get("guarded"):
            self.guarded.inc(p["guarded"])
        if p.get("guard_fires"):
            self.guard_fires.inc(p["guard_fires"])
        if p.get("sparse_rows"):
            self.sparse_rows.inc(p["sparse_rows"])
        if p.get("no_step"):
            self.no_step.inc(p["no_step"])
        for key in PATH_COUNTERS:
            if p.get(key):
                self.paths.labels(path=key.removeprefix("path_")).inc(p[key])
        self.win_planned += p.get("planned", 0)
        self.win_guarded += p.get("guarded", 0)
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
        if self.win_guarded:
            line += f", full head by the guard {100.0 * self.win_guarded / max(1, self.win_planned):.1f}% of drafts"
        self.win_sizes = self.win_n = self.win_target = self.win_covered = self.win_planned = self.win_guarded = 0
        return line
