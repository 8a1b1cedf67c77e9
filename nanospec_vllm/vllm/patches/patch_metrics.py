"""Patches that carry NanoSpec statistics from the engine core to the front end's loggers.

* ``vllm.v1.metrics.stats:SchedulerStats.nanospec_stats`` (every process): add NanoSpec's own dataclass
  field ``nanospec_stats: dict[str, Any] | None = None`` (``init=False``, not in ``repr``/``==``). vLLM's msgpack
  encoder serialises a dataclass's declared fields only and its typed decoder rebuilds them, so the field crosses
  the engine-core -> front-end socket; no vLLM code reads it, so no EC/KV connector, vLLM logger or Prometheus
  collector ever sees NanoSpec's payload (it used to ride in ``ec_connector_stats``, a field vLLM's loggers read).
  Refuses to start if vLLM ever declares a field of that name.
* ``vllm.v1.core.sched.scheduler:Scheduler.update_from_output`` (engine core): move the worker's
  ``ModelRunnerOutput.nanospec_stats`` onto the outgoing ``SchedulerStats.nanospec_stats``. Payloads wait (merged,
  bounded) while stats are off.
* ``vllm.v1.metrics.loggers:StatLoggerManager.record`` (front end): take that payload off and feed the
  ``nanospec_*`` Prometheus metrics.
* ``StatLoggerManager.log``: print the NanoSpec line after vLLM's periodic lines.

Cost: a dict merge per step; the field adds one ``None`` (or the small payload) to each encoded SchedulerStats.
Removal: when vLLM lets plugins add scheduler stats.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any

from ..metrics.transport import STATS_FIELD
from .base import Patch, PatchError
from .scope import engine_configured

logger = logging.getLogger("vllm.nanospec")
MAX_PENDING = 256
_FIELD_TYPE = dict[str, Any] | None  # a runtime type object: msgspec reads it from the class annotations
_MSGSPEC_CACHE = "__msgspec_cache__"  # where msgspec caches a dataclass's decoding info on the class


def _stats_field() -> dataclasses.Field:
    @dataclasses.dataclass
    class _Carrier:
        nanospec_stats: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    f = _Carrier.__dataclass_fields__[STATS_FIELD]
    f.type = _FIELD_TYPE
    return f


def _make_field(fields: dict[str, Any]) -> dataclasses.Field:
    """The ``dataclasses.Field`` to add to ``fields`` (the owner's ``__dataclass_fields__``)."""
    if STATS_FIELD in fields:
        raise PatchError(f"vllm.v1.metrics.stats:SchedulerStats already declares a field {STATS_FIELD!r}; "
                         "NanoSpec's statistics transport would collide with it")
    return _stats_field()


class _Unset:
    """Class-level value of the added field: an instance that never set it reads ``None`` (a non-data
    descriptor, so an instance's own value wins). Carries the patch marker."""

    _nanospec_patch: str

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else None


class _FieldPatch(Patch):
    """Adds a dataclass field (target ``module:Owner.field``) instead of replacing an attribute: the entry in
    ``__dataclass_fields__`` (what msgspec encodes and decodes), the annotation msgspec reads the field's type
    from, and the class-level default (:class:`_Unset`: instances made by vLLM's ``__init__`` read ``None``).
    Drops msgspec's cached decoding info so decoders built afterwards know the field; a decoder built before the
    plugin loaded would not (the plugin loads before the engine client builds its decoder). Refuses to add a
    field the owner already has (a vLLM upgrade that declares one fails at start-up and in the drift test)."""

    def resolve(self) -> tuple[Any, str, Any]:
        mod_name, _, path = self.target.partition(":")
        owner_path, _, attr = path.rpartition(".")
        owner = Patch(f"{mod_name}:{owner_path}", self.why, self.removal, self.make).resolve()[2]
        if not dataclasses.is_dataclass(owner) or not isinstance(owner, type):
            raise PatchError(f"{self.target}: {owner_path} is not a dataclass")
        return owner, attr, vars(owner).get(attr)

    def apply(self) -> bool:
        if not self.when():
            return False
        owner, attr, current = self.resolve()
        marker = getattr(current, "_nanospec_patch", None)
        if marker == self.name:
            return False
        if marker is not None or attr in vars(owner) or attr in inspect.get_annotations(owner):
            raise PatchError(f"{self.target}: {owner.__name__}.{attr} already exists")
        fields = owner.__dataclass_fields__  # msgspec wants this exact dict: extend it in place
        new_field = self.make(fields)
        unset = _Unset()
        unset._nanospec_patch = self.name
        fields[attr] = new_field
        owner.__annotations__[attr] = new_field.type
        setattr(owner, attr, unset)
        if _MSGSPEC_CACHE in vars(owner):
            delattr(owner, _MSGSPEC_CACHE)
        return True

    def remove(self) -> None:
        """Take the field away again (tests only)."""
        owner, attr, current = self.resolve()
        if getattr(current, "_nanospec_patch", None) != self.name:
            return
        owner.__dataclass_fields__.pop(attr, None)
        owner.__annotations__.pop(attr, None)
        delattr(owner, attr)
        if _MSGSPEC_CACHE in vars(owner):
            delattr(owner, _MSGSPEC_CACHE)


def _make_update(orig: Any) -> Any:
    def update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        from ..metrics.transport import attach, merge_payloads

        p = getattr(model_runner_output, STATS_FIELD, None)  # NanoSpec's own field: absent on plain engines
        pending = self.__dict__.get("_nanospec_pending")
        if p:
            if pending is None:
                pending = self.__dict__["_nanospec_pending"] = []
            pending.append(p)
            if len(pending) > MAX_PENDING:
                pending[:] = [merge_payloads(pending)]
        out = orig(self, scheduler_output, model_runner_output)
        if pending:
            for eco in out.values():
                st = eco.scheduler_stats  # EngineCoreOutputs field (tests/unit/test_vllm_reads.py)
                if st is not None:
                    attach(st, merge_payloads(pending))
                    pending.clear()
                    break
        return out

    return update_from_output


def transport_works() -> bool:
    """Whether ``SchedulerStats.nanospec_stats`` survives a msgpack round trip of ``EngineCoreOutputs`` in this
    process. msgspec caches a type's decoding layout once per process (``EngineCoreOutputs`` keeps the one of its
    ``SchedulerStats``), so a decoder built before the plugin added the field would drop it. Cost: one tiny
    encode/decode; the record patch asks once per process."""
    import msgspec
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats

    st = SchedulerStats()
    setattr(st, STATS_FIELD, {"probe": 1})
    wire = msgspec.msgpack.encode(EngineCoreOutputs(scheduler_stats=st))
    got = msgspec.msgpack.Decoder(EngineCoreOutputs).decode(wire).scheduler_stats
    return getattr(got, STATS_FIELD, None) == {"probe": 1}


_checked = False


def _make_record(orig: Any) -> Any:
    def record(self: Any, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: Any = None) -> Any:
        global _checked
        from ..metrics.transport import take

        if not _checked and engine_configured():
            _checked = True
            if not transport_works():
                logger.error("NanoSpec: SchedulerStats.%s does not survive vLLM's output decoding in this process "
                             "(its decoder was built before the NanoSpec plugin loaded); nanospec_* metrics "
                             "will stay empty when the engine core runs in its own process", STATS_FIELD)
        payload = take(scheduler_stats) if scheduler_stats is not None else None
        if payload:
            from ..metrics.frontend import FrontendMetrics

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
    _FieldPatch("vllm.v1.metrics.stats:SchedulerStats.nanospec_stats",
                why="a `nanospec_stats` field of NanoSpec's own, so worker statistics cross vLLM's msgpack "
                    "transport in a field no vLLM reader (connector, logger, Prometheus) looks at",
                removal="plugin scheduler stats", make=_make_field,
                plain="every process: the field must exist before vLLM builds its msgpack decoder, and the engine core "
                      "loads plugins before it knows its config; a plain engine's SchedulerStats carry one more "
                      "field (None), which no vLLM code reads"),
    Patch("vllm.v1.core.sched.scheduler:Scheduler.update_from_output",
          why="carry worker statistics in SchedulerStats.nanospec_stats", removal="plugin scheduler stats",
          make=_make_update, expect_params=("self", "scheduler_output", "model_runner_output"),
          plain="unchanged: without a worker payload the wrapper calls vLLM's method and returns its result"),
    Patch("vllm.v1.metrics.loggers:StatLoggerManager.record",
          why="export NanoSpec statistics on /metrics", removal="plugin scheduler stats",
          make=_make_record, expect_params=("self", "scheduler_stats", "iteration_stats", "mm_cache_stats",
                                             "engine_idx"),
          plain="unchanged: without a payload the wrapper calls vLLM's method with the same arguments; the "
                "transport self-check runs only where a NanoSpec engine was configured"),
    Patch("vllm.v1.metrics.loggers:StatLoggerManager.log",
          why="NanoSpec line next to vLLM's SpecDecoding line", removal="plugin scheduler stats",
          make=_make_log, expect_params=("self",),
          plain="unchanged: the NanoSpec line is printed only after a NanoSpec payload arrived"),
]
