"""Patches that carry NanoSpec statistics from the engine core to the front end's loggers.

* ``vllm.v1.core.sched.scheduler:Scheduler.update_from_output`` (engine core): move the worker's
  ``ModelRunnerOutput.nanospec_stats`` into ``SchedulerStats.ec_connector_stats["__nanospec__"]`` (a dict field
  that survives vLLM's msgpack transport; extra attributes do not). Payloads wait while stats are off.
* ``vllm.v1.metrics.loggers:StatLoggerManager.record`` (front end): pop that payload before vLLM's own loggers
  (which would treat it as connector stats) and feed the ``nanospec_*`` Prometheus metrics.
* ``StatLoggerManager.log``: print the NanoSpec line after vLLM's periodic lines.

Cost: a dict merge per step. Removal: when vLLM lets plugins add scheduler stats.
"""

from __future__ import annotations

import logging
from typing import Any

from .base import Patch

logger = logging.getLogger("vllm.nanospec")
MAX_PENDING = 256


def _make_update(orig: Any) -> Any:
    def update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        from ..metrics.transport import PAYLOAD_KEY, merge_payloads

        p = getattr(model_runner_output, "nanospec_stats", None)
        pending = self.__dict__.setdefault("_nanospec_pending", [])
        if p:
            pending.append(p)
            if len(pending) > MAX_PENDING:
                pending[:] = [merge_payloads(pending)]
        out = orig(self, scheduler_output, model_runner_output)
        if pending:
            for eco in out.values():
                st = getattr(eco, "scheduler_stats", None)
                if st is not None:
                    ecs = dict(st.ec_connector_stats or {})
                    ecs[PAYLOAD_KEY] = merge_payloads(pending)
                    st.ec_connector_stats = ecs
                    pending.clear()
                    break
        return out

    return update_from_output


def _make_record(orig: Any) -> Any:
    def record(self: Any, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: Any = None) -> Any:
        from ..metrics.frontend import FrontendMetrics
        from ..metrics.transport import PAYLOAD_KEY

        ecs = getattr(scheduler_stats, "ec_connector_stats", None)
        if isinstance(ecs, dict) and PAYLOAD_KEY in ecs:
            ecs = dict(ecs)
            payload = ecs.pop(PAYLOAD_KEY)
            scheduler_stats.ec_connector_stats = ecs or None
            if payload:
                FrontendMetrics.get().observe(payload)
        return orig(self, scheduler_stats, iteration_stats, mm_cache_stats, engine_idx)

    return record


def _make_log(orig: Any) -> Any:
    def log(self: Any) -> Any:
        from ..metrics.frontend import FrontendMetrics

        out = orig(self)
        if FrontendMetrics._instance is not None:
            line = FrontendMetrics.get().log_line()
            if line:
                logger.info(line)
        return out

    return log


PATCHES = [
    Patch("vllm.v1.core.sched.scheduler:Scheduler.update_from_output",
          why="carry worker statistics inside SchedulerStats", removal="plugin scheduler stats",
          make=_make_update, expect_params=("self", "scheduler_output", "model_runner_output")),
    Patch("vllm.v1.metrics.loggers:StatLoggerManager.record",
          why="export NanoSpec statistics on /metrics", removal="plugin scheduler stats",
          make=_make_record, expect_params=("self", "scheduler_stats", "iteration_stats", "mm_cache_stats",
                                             "engine_idx")),
    Patch("vllm.v1.metrics.loggers:StatLoggerManager.log",
          why="NanoSpec line next to vLLM's SpecDecoding line", removal="plugin scheduler stats",
          make=_make_log, expect_params=("self",)),
]
