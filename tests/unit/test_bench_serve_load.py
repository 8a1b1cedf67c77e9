"""``nanospec bench serve-load``'s pure parts: schedule parsing (vLLM's ranges), configurations, speed ratios."""

from __future__ import annotations

import pytest

from nanospec_vllm.tools.bench.serve_load import ServeLoadError, build_configs, parse_schedule, speedups

SPEC = {"method": "eagle", "model": "/h", "num_speculative_tokens": 3, "nanospec": {"guard_coverage": 0}}


def test_schedule_parses_sorted_inclusive_ranges() -> None:
    assert parse_schedule("4-256:0, 1-3:3") == [(1, 3, 3), (4, 256, 0)]
    assert parse_schedule("1-1:2") == [(1, 1, 2)]


@pytest.mark.parametrize("bad,needle", [("2-4:3", "start at batch size 1"), ("1-4:3,4-8:0", "overlap"),
                                        ("1-4", "LO-HI:K"), ("1-4:-1", "K >= 0"), ("4-1:3", "LO <= HI"),
                                        ("a-b:c", "LO-HI:K")])
def test_bad_schedules_say_what_is_wrong(bad, needle) -> None:
    with pytest.raises(ServeLoadError, match=needle):
        parse_schedule(bad)


def test_configurations() -> None:
    nos, head, ns, sched = build_configs(["no-spec", "head", "nanospec", "nanospec@1-1:3,2-16:0"], SPEC)
    assert nos == {"name": "no-spec", "spec": None}
    assert "nanospec" not in head["spec"] and head["spec"]["method"] == "eagle"
    assert ns["spec"]["nanospec"] == {"guard_coverage": 0}
    assert sched["spec"]["num_speculative_tokens_per_batch_size"] == [[1, 1, 3], [2, 16, 0]]
    assert "num_speculative_tokens_per_batch_size" not in ns["spec"]  # the file's dict is not modified
    assert build_configs(["nanospec"], {"method": "eagle"})[0]["spec"]["nanospec"] == {}  # defaults
    with pytest.raises(ServeLoadError, match="needs --spec"):
        build_configs(["head"], None)
    with pytest.raises(ServeLoadError, match="unknown configuration"):
        build_configs(["fast"], SPEC)
    with pytest.raises(ServeLoadError, match="no schedule"):
        build_configs(["no-spec@1-1:3"], SPEC)


def test_speedups_compare_at_the_same_concurrency() -> None:
    rows = [{"config": "no-spec", "concurrency": 1, "output_tok_s": 30.0},
            {"config": "no-spec", "concurrency": 8, "output_tok_s": 90.0},
            {"config": "head", "concurrency": 1, "output_tok_s": 20.0},
            {"config": "nanospec", "concurrency": 1, "output_tok_s": 27.0},
            {"config": "nanospec@1-1:3,2-16:0", "concurrency": 8, "output_tok_s": 81.0}]
    speedups(rows)
    assert rows[3]["speed_vs_no_spec"] == 0.9 and rows[3]["speed_vs_head"] == 1.35
    assert rows[4]["speed_vs_no_spec"] == 0.9 and rows[4]["speed_vs_head"] is None  # no head row at 8
    assert rows[0]["speed_vs_no_spec"] == 1.0
