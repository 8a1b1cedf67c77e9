"""``nanospec bench soak`` without a server: the request mix, the greedy-identity comparison and the checks
that decide the exit status (known answers on hand-made results)."""

from __future__ import annotations

import random
from collections import Counter

from nanospec_vllm.tools.bench.soak import KINDS, MAX_TOKENS, Plan, Result, compare, plan_request, summarize
from nanospec_vllm.tools.server import metric


def _ok(endpoint: str, prompt: int, text: str, nanospec: bool, **kw) -> Result:
    return Result(Plan("complete", endpoint, prompt, 32, False, nanospec, **kw), "ok", text=text)


def _summary(results: list[Result], **kw) -> dict:
    args = {"preemptions": 3, "slots_in_use_end": 0.0, "running_end": 0.0, "healthy": True, "rss_start_mb": 1000.0,
            "rss_end_mb": 1100.0, "max_rss_growth_mb": 512.0}
    args.update(kw)
    return summarize(results, **args)


def _exercising() -> list[Result]:
    return [_ok("chat", 0, "a", True), _ok("chat", 0, "a", False),
            Result(Plan("disconnect", "chat", 1, 200, True, True, disconnect_after=3), "disconnect"),
            Result(Plan("abort", "completions", 1, 200, True, False, timeout_s=1.0), "abort")]


def test_plan_mix_is_seeded_and_covers_every_kind():
    a = [plan_request(random.Random(7), 5) for _ in range(3)]
    b = [plan_request(random.Random(7), 5) for _ in range(3)]
    assert a == b
    rng = random.Random(0)
    plans = [plan_request(rng, 5) for _ in range(2000)]
    kinds = Counter(p.kind for p in plans)
    assert set(kinds) == set(KINDS) and all(n > 150 for n in kinds.values())
    assert {p.endpoint for p in plans} == {"completions", "chat"} and {p.nanospec for p in plans} == {True, False}
    assert all(0 <= p.prompt < 5 and p.max_tokens in MAX_TOKENS for p in plans)
    assert all(p.stream for p in plans if p.kind == "disconnect") and not any(p.stream for p in plans if p.kind == "abort")
    assert all(1 <= p.disconnect_after <= 12 for p in plans if p.kind == "disconnect")
    assert all(0.5 <= p.timeout_s <= 4 for p in plans if p.kind == "abort")
    sampled = [p for p in plans if p.temperature > 0]
    assert sampled and all(p.seed is not None and p.kind in ("complete", "stream") for p in sampled)


def test_compare_finds_a_switch_on_difference_and_nothing_else():
    results = [_ok("chat", 0, "same", True), _ok("chat", 0, "same", False), _ok("chat", 0, "same", True),
               _ok("completions", 0, "x", True), _ok("completions", 0, "y", False),  # mismatch
               _ok("completions", 1, "no reference", True),  # nothing to compare with
               _ok("chat", 1, "sampled", True, temperature=0.8, seed=1),  # sampled: never compared
               _ok("chat", 1, "other", False),
               Result(Plan("disconnect", "chat", 0, 32, False, True), "disconnect", text="sa")]
    refs, mismatches, compared = compare(results)
    assert refs == {("chat", 0, 32, False): "same", ("completions", 0, 32, False): "y",
                    ("chat", 1, 32, False): "other"}
    assert compared == 6
    assert len(mismatches) == 1 and mismatches[0]["text"] == "x" and mismatches[0]["reference"] == "y"
    assert mismatches[0]["nanospec"] is True


def test_summary_counts_and_passes_a_clean_run():
    s = _summary(_exercising())
    assert (s["requests"], s["completed"], s["disconnects"], s["aborts"], s["errors_5xx"], s["mismatches"]) == \
        (4, 2, 1, 1, 0, 0)
    assert s["rss_growth_mb"] == 100.0 and s["compared"] == 2 and s["compared_nanospec_on"] == 1
    assert s["passed"] is True
    s = _summary(_exercising() + [_ok("chat", 5, "no reference", True)])
    assert s["compared"] == 2 and s["compared_nanospec_on"] == 1
    assert set(s["checks"]) == {"no_5xx", "no_other_errors", "greedy_identical", "healthy", "slots_released",
                                "rss_within_bound", "exercised"}


def test_each_failure_fails_its_check():
    base = _exercising()
    cases = {
        "no_5xx": (base + [Result(Plan("complete", "chat", 0, 8, False, True), "http_500")], {}),
        "no_other_errors": (base + [Result(Plan("stream", "chat", 0, 8, False, True), "error")], {}),
        "greedy_identical": (base + [_ok("chat", 0, "b", True)], {}),
        "healthy": (base, {"healthy": False}),
        "slots_released": (base, {"slots_in_use_end": 1.0}),
        "rss_within_bound": (base, {"rss_end_mb": 1600.0}),
        "exercised": (base, {"preemptions": 0}),
    }
    for check, (results, kw) in cases.items():
        s = _summary(results, **kw)
        assert s["passed"] is False and [k for k, v in s["checks"].items() if not v] == [check], check
    assert _summary(base, running_end=2.0)["checks"]["slots_released"] is False
    assert "exercised" not in _summary(base, preemptions=0, require_exercised=False)["checks"]
    # a reference re-run counts in the comparison and in the failures, not in the driving counts
    s = _summary(base + [Result(Plan("complete", "chat", 0, 8, False, False), "http_503", phase="reference")])
    assert s["requests"] == 4 and s["errors_5xx"] == 1 and s["checks"]["no_5xx"] is False


def test_metric_sums_label_sets():
    page = "# HELP x\nvllm:num_preemptions_total{engine=\"0\"} 2.0\nvllm:num_preemptions_total{engine=\"1\"} 3.0\n" \
           "vllm:num_preemptions_created 1.7e9\n"
    assert metric(page, "vllm:num_preemptions_total") == 5.0
    try:
        metric(page, "nanospec_slots_in_use")
    except KeyError:
        pass
    else:
        raise AssertionError("a missing metric must raise")


def test_rss_trend_tells_a_steady_rise_from_one_that_flattens():
    from nanospec_vllm.tools.bench.soak import rss_trend

    steady = [[60.0 * i, 1000.0 + 10 * i] for i in range(11)]  # +10 MiB/min throughout
    t = rss_trend(steady)
    assert t["first_half_mb_per_min"] == 10.0 and t["second_half_mb_per_min"] == 10.0 and t["samples"] == 11
    assert t["last_quarter_mb_per_min"] == 10.0
    flat = [[60.0 * i, 1000.0 + 10 * min(i, 5)] for i in range(11)]  # rises 5 minutes, then flat
    t = rss_trend(flat)
    assert t["first_half_mb_per_min"] == 10.0 and t["second_half_mb_per_min"] == 0.0
    late = [[60.0 * i, 1000.0 + 30 * (i >= 6)] for i in range(12)]  # one step in the middle, flat after it
    assert rss_trend(late)["last_quarter_mb_per_min"] == 0.0
    assert rss_trend([[0.0, 1.0]])["first_half_mb_per_min"] is None


def test_tree_rss_parts_names_each_process_and_sums_to_the_tree():
    import os

    from nanospec_vllm.tools.server import tree_rss_mb, tree_rss_parts

    parts = tree_rss_parts(os.getpid())
    mine = [k for k in parts if k.endswith(f" {os.getpid()}")]
    assert len(mine) == 1 and parts[mine[0]] > 10
    assert abs(sum(parts.values()) - tree_rss_mb(os.getpid())) < 0.2 * sum(parts.values())


def test_plot_rss_writes_a_png(tmp_path):
    from nanospec_vllm.tools.bench.soak import plot_rss

    report = {"rss_samples_mb": [[0.0, 10.0], [30.0, 12.0]], "header": {"command": "nanospec bench soak"},
              "rss_by_process_mb": [[0.0, {"a 1": 4.0, "b 2": 6.0}], [30.0, {"a 1": 4.0, "b 2": 8.0}]]}
    plot_rss(report, str(tmp_path / "rss.png"))
    assert (tmp_path / "rss.png").read_bytes()[:4] == b"\x89PNG"
