"""Statistics plumbing without an engine: worker accumulator -> merged payload -> front-end metrics/log line."""

from __future__ import annotations

import types

import pytest
import torch

from nanospec_vllm.state import ActiveVocabPool
from nanospec_vllm.vllm.metrics import PAYLOAD_KEY, merge_payloads
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
    p = st.drain(pool, "native")
    assert p == {"slots_in_use": 1, "sizes": [8, 4], "target": 7, "covered": 5, "dropped_live": 12, "no_slot": 0,
                 "fallback": 1, "impl": "native"}
    q = st.drain(pool, "native")
    assert q["target"] == 0 and q["sizes"] == [] and q["fallback"] == 0


def test_merge_payloads_sums_counters_keeps_latest_gauges():
    a = {"slots_in_use": 3, "sizes": [1, 2], "target": 4, "covered": 1, "dropped_live": 0, "no_slot": 0,
         "fallback": 0, "impl": "torch"}
    b = {"slots_in_use": 1, "sizes": [5], "target": 6, "covered": 6, "dropped_live": 2, "no_slot": 1,
         "fallback": 2, "impl": "torch"}
    m = merge_payloads([a, {}, b])
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


def test_record_patch_pops_payload_before_vllm_loggers():
    pytest.importorskip("vllm")
    from nanospec_vllm.vllm.patches.patch_metrics import _make_record

    seen = {}

    def orig(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=None):
        seen["ecs"] = scheduler_stats.ec_connector_stats

    record = _make_record(orig)
    stats = types.SimpleNamespace(ec_connector_stats={PAYLOAD_KEY: {"target": 1, "covered": 1, "sizes": [3]}})
    record(None, stats, None)
    assert seen["ecs"] is None  # vLLM's connector loggers never see NanoSpec's payload
