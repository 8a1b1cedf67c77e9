"""Statistics plumbing without an engine: worker accumulator -> merged payload -> vLLM's own msgpack transport ->
front-end metrics/log line, and that no reader of vLLM's ``ec_connector_stats`` ever sees NanoSpec's payload."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from nanospec_vllm.state import ActiveVocabPool
from nanospec_vllm.vllm.metrics import STATS_FIELD, attach, merge_payloads, take
from nanospec_vllm.vllm.metrics.frontend import FrontendMetrics
from nanospec_vllm.vllm.metrics.worker import StepStats

pytest.importorskip("prometheus_client")


def test_step_stats_drain_counts_and_resets():
    pool = ActiveVocabPool(4, 1000, 8)
    pool.seed("a", list(range(20)))  # 12 ids dropped by the full set
    st = StepStats("cpu")
    st.add_coverage(torch.tensor(5), torch.tensor(3))
    st.add_coverage(torch.tensor(2), torch.tensor(2))
    st.record_sizes(torch.tensor([8, 4], dtype=torch.int32))
    st.fallback += 1
    st.planned += 3
    st.guarded += 2
    st.guard_fires += 1
    st.sparse_rows += 6
    st.no_step += 2
    st.count_path("union")
    st.count_path("per_request")
    st.count_path("union")
    with pytest.raises(ValueError, match="unknown head path"):
        st.count_path("sideways")
    p = st.drain(pool, "native")
    assert p == {"slots_in_use": 1, "sizes": [8, 4], "target": 7, "covered": 5, "dropped_live": 12, "no_slot": 0,
                 "fallback": 1, "planned": 3, "guarded": 2, "guard_fires": 1, "sparse_rows": 6, "no_step": 2,
                 "path_per_request": 1, "path_union": 2, "path_dense": 0, "impl": "native"}
    q = st.drain(pool, "native")
    assert q["target"] == 0 and q["sizes"] == [] and q["fallback"] == 0 and q["guarded"] == 0
    assert q["sparse_rows"] == 0 and q["no_step"] == 0 and q["path_union"] == 0
    assert st.totals["guarded"] == 2 and st.totals["planned"] == 3 and st.totals["sparse_rows"] == 6


def test_merge_payloads_sums_counters_keeps_latest_gauges():
    a = {"slots_in_use": 3, "sizes": [1, 2], "target": 4, "covered": 1, "dropped_live": 0, "no_slot": 0,
         "fallback": 0, "impl": "torch"}
    b = {"slots_in_use": 1, "sizes": [5], "target": 6, "covered": 6, "dropped_live": 2, "no_slot": 1,
         "fallback": 2, "planned": 4, "guarded": 3, "guard_fires": 1, "sparse_rows": 5, "impl": "torch"}
    m = merge_payloads([a, {}, {"guarded": 1, "sparse_rows": 2}, b])
    assert m["guarded"] == 4 and m["planned"] == 4 and m["guard_fires"] == 1 and m["sparse_rows"] == 7
    assert m["slots_in_use"] == 1 and m["sizes"] == [1, 2, 5] and m["target"] == 10 and m["covered"] == 7
    assert m["fallback"] == 2 and m["no_slot"] == 1 and m["dropped_live"] == 2
    assert merge_payloads([]) is None


def test_frontend_metrics_and_log_line():
    fm = FrontendMetrics.get()
    assert FrontendMetrics.get() is fm
    fm.log_line()  # reset the window
    before = fm.target._value.get()
    fm.observe({"slots_in_use": 2, "sizes": [100, 300], "target": 10, "covered": 8, "dropped_live": 0,
                "no_slot": 0, "fallback": 0, "impl": "native"})
    assert fm.target._value.get() == before + 10
    line = fm.log_line()
    assert line == ("NanoSpec metrics: mean active vocab 200 ids, coverage 80.0% (8/10 target tokens at drafted "
                    "positions), slots in use 2")
    assert fm.log_line() is None  # nothing new since the last line
    g0 = fm.guarded._value.get()
    fm.observe({"slots_in_use": 1, "sizes": [50], "target": 4, "covered": 1, "planned": 4, "guarded": 1,
                "guard_fires": 1})
    assert fm.guarded._value.get() == g0 + 1
    assert fm.log_line().endswith("slots in use 1, full head by the guard 25.0% of drafts")
    u0, d0, n0 = (fm.paths.labels(path="union")._value.get(), fm.paths.labels(path="dense")._value.get(),
                  fm.no_step._value.get())
    fm.observe({"path_union": 3, "path_dense": 1, "path_per_request": 0, "no_step": 2})
    assert fm.paths.labels(path="union")._value.get() == u0 + 3
    assert fm.paths.labels(path="dense")._value.get() == d0 + 1
    assert fm.no_step._value.get() == n0 + 2


def test_attach_merges_and_take_empties():
    st = types.SimpleNamespace()
    assert take(st) is None
    attach(st, None)
    assert not hasattr(st, STATS_FIELD)
    attach(st, {"target": 2, "covered": 1, "sizes": [5], "slots_in_use": 3})
    attach(st, {"target": 4, "covered": 4, "sizes": [7], "slots_in_use": 1})
    p = take(st)
    assert p["target"] == 6 and p["covered"] == 5 and p["sizes"] == [5, 7] and p["slots_in_use"] == 1
    assert take(st) is None and getattr(st, STATS_FIELD) is None


# ---------------------------------------------------------------- the transport, through vLLM's real classes
PAYLOAD = {"slots_in_use": 2, "sizes": [100, 300], "target": 10, "covered": 8, "dropped_live": 0, "no_slot": 0,
           "planned": 2, "guarded": 1, "guard_fires": 1, "sparse_rows": 0, "no_step": 0,
           "path_per_request": 0, "path_union": 3, "path_dense": 1, "fallback": 0, "impl": "native"}
EC_STATS = {"num_loads": 3, "bytes": [1, 2]}  # what an EC connector would report (ECConnectorStats.data)


@pytest.fixture()
def vllm_stats():
    """vLLM's SchedulerStats / EngineCoreOutputs and msgpack codec, with the NanoSpec register applied."""
    pytest.importorskip("vllm")
    from nanospec_vllm.vllm.patches import apply_all

    apply_all()
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    def roundtrip(eco):
        return MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(eco))

    return types.SimpleNamespace(SchedulerStats=SchedulerStats, EngineCoreOutputs=EngineCoreOutputs,
                                 roundtrip=roundtrip)


def _scheduler_step(v, payload):
    """The patched ``Scheduler.update_from_output`` around a stand-in for vLLM's original that returns what the
    real one returns: outputs per client, one carrying a SchedulerStats with an EC connector's stats."""
    from nanospec_vllm.vllm.patches.patch_metrics import _make_update

    seen = {}

    def orig(self, scheduler_output, model_runner_output):
        st = v.SchedulerStats(num_running_reqs=1, ec_connector_stats=dict(EC_STATS))
        return {0: v.EngineCoreOutputs(scheduler_stats=st)}

    update = _make_update(orig)
    sched = types.SimpleNamespace()
    out = update(sched, None, types.SimpleNamespace(nanospec_stats=payload))
    seen["ec_in_core"] = dict(out[0].scheduler_stats.ec_connector_stats)
    return out[0], seen


def test_payload_crosses_vllm_msgpack_in_its_own_field(vllm_stats):
    eco, seen = _scheduler_step(vllm_stats, dict(PAYLOAD))
    assert seen["ec_in_core"] == EC_STATS  # engine-core readers see the connector's stats untouched
    dec = vllm_stats.roundtrip(eco)
    assert type(dec.scheduler_stats) is vllm_stats.SchedulerStats
    assert dec.scheduler_stats.nanospec_stats == PAYLOAD
    assert dec.scheduler_stats.ec_connector_stats == EC_STATS
    # a SchedulerStats vLLM builds without NanoSpec (no payload this step) encodes and decodes to None
    plain = vllm_stats.roundtrip(vllm_stats.EngineCoreOutputs(scheduler_stats=vllm_stats.SchedulerStats()))
    assert plain.scheduler_stats.nanospec_stats is None and vllm_stats.SchedulerStats().nanospec_stats is None
    # vLLM's dataclass helpers still work on the patched class (init=False: not a constructor argument)
    assert dataclasses.replace(dec.scheduler_stats, num_running_reqs=2).num_running_reqs == 2
    assert STATS_FIELD in {f.name for f in dataclasses.fields(vllm_stats.SchedulerStats)}


def test_extra_attribute_would_be_dropped_without_the_field(vllm_stats):
    """Why the field patch exists: vLLM's encoder serialises declared dataclass fields only."""
    import msgspec
    from vllm.v1.serial_utils import MsgpackEncoder

    from nanospec_vllm.vllm.patches.patch_metrics import PATCHES

    field_patch = PATCHES[0]
    field_patch.remove()
    try:
        st = vllm_stats.SchedulerStats()
        st.nanospec_stats = dict(PAYLOAD)
        wire = msgspec.msgpack.decode(MsgpackEncoder().encode(vllm_stats.EngineCoreOutputs(scheduler_stats=st))[0])
        assert STATS_FIELD not in wire[2]  # EngineCoreOutputs is array-like: [engine_index, outputs, stats, ...]
    finally:
        assert field_patch.apply()
    st = vllm_stats.SchedulerStats()
    st.nanospec_stats = dict(PAYLOAD)
    assert vllm_stats.roundtrip(vllm_stats.EngineCoreOutputs(scheduler_stats=st)).scheduler_stats.nanospec_stats \
        == PAYLOAD


def test_no_reader_of_ec_connector_stats_sees_the_payload(vllm_stats):
    """Engine core -> msgpack -> the real (patched) ``StatLoggerManager.record`` -> a vLLM stat logger: the logger
    reads the connector's stats exactly as the connector reported them, and no NanoSpec payload anywhere."""
    from vllm.v1.metrics.loggers import StatLoggerBase, StatLoggerManager

    seen = []

    class Reader(StatLoggerBase):
        def __init__(self) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            seen.append((scheduler_stats.ec_connector_stats, scheduler_stats.kv_connector_stats,
                         scheduler_stats.nanospec_stats))

        def log_engine_initialized(self) -> None:
            pass

    mgr = object.__new__(StatLoggerManager)
    mgr.stat_loggers = [Reader()]
    fm = FrontendMetrics.get()
    before = fm.target._value.get()
    eco, _ = _scheduler_step(vllm_stats, dict(PAYLOAD))
    dec = vllm_stats.roundtrip(eco)
    StatLoggerManager.record(mgr, dec.scheduler_stats, None, engine_idx=0)
    assert seen == [(EC_STATS, None, None)]
    assert fm.target._value.get() == before + PAYLOAD["target"]  # and the payload did reach NanoSpec's metrics


def test_payloads_wait_while_stats_are_off_and_stay_bounded():
    from nanospec_vllm.vllm.patches.patch_metrics import MAX_PENDING, _make_update

    stats_on = []  # a SchedulerStats stand-in once stats are sent again

    def orig(self, scheduler_output, model_runner_output):
        return {0: types.SimpleNamespace(scheduler_stats=stats_on[0] if stats_on else None)}

    update = _make_update(orig)
    sched = types.SimpleNamespace()
    n = MAX_PENDING + 10
    for _ in range(n):
        update(sched, None, types.SimpleNamespace(nanospec_stats={"target": 1, "covered": 1, "sizes": [4]}))
    assert 0 < len(sched._nanospec_pending) <= MAX_PENDING
    stats_on.append(types.SimpleNamespace())
    update(sched, None, types.SimpleNamespace(nanospec_stats=None))
    carried = take(stats_on[0])
    assert carried["target"] == n and carried["covered"] == n and len(carried["sizes"]) == n  # nothing lost
    assert not sched._nanospec_pending


@dataclasses.dataclass
class _Declares:
    nanospec_stats: int = 0


@dataclasses.dataclass
class _Plain:
    a: int = 1


def test_field_patch_refuses_a_field_vllm_already_declares_and_is_idempotent():
    import msgspec

    from nanospec_vllm.vllm.patches.base import PatchError
    from nanospec_vllm.vllm.patches.patch_metrics import _FieldPatch, _make_field

    clash = _FieldPatch(f"{__name__}:_Declares.nanospec_stats", why="w", removal="r", make=_make_field)
    with pytest.raises(PatchError, match="already"):
        clash.apply()
    p = _FieldPatch(f"{__name__}:_Plain.nanospec_stats", why="w", removal="r", make=_make_field)
    assert p.apply() and not p.apply()
    try:
        assert _Plain().nanospec_stats is None
        x = _Plain()
        x.nanospec_stats = {"k": [1]}
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(x), type=_Plain).nanospec_stats == {"k": [1]}
    finally:
        p.remove()
    assert STATS_FIELD not in _Plain.__dataclass_fields__ and not hasattr(_Plain(), STATS_FIELD)


def test_a_decoder_built_before_the_plugin_is_detected(tmp_path):
    """msgspec caches EngineCoreOutputs' layout once per process: the field must exist before vLLM builds its
    output decoder (the plugin loads first). ``transport_works`` tells the two orders apart (fresh processes)."""
    pytest.importorskip("vllm")
    import subprocess
    import sys

    code = """
import sys
from vllm.v1.engine import EngineCoreOutputs
from vllm.v1.serial_utils import MsgpackDecoder
if sys.argv[1] == "decoder-first":
    MsgpackDecoder(EngineCoreOutputs)
from nanospec_vllm.vllm.patches import apply_all
from nanospec_vllm.vllm.patches.patch_metrics import transport_works
apply_all()
print("RESULT", transport_works())
"""
    res = {}
    for order in ("plugin-first", "decoder-first"):
        p = subprocess.run([sys.executable, "-c", code, order], capture_output=True, text=True, timeout=300,
                           check=False)
        assert p.returncode == 0, p.stderr[-2000:]
        res[order] = p.stdout.split("RESULT")[-1].strip()
    assert res == {"plugin-first": "True", "decoder-first": "False"}
