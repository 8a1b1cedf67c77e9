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


def test_a_configuration_that_does_not_start_is_recorded_and_the_rest_run(tmp_path, monkeypatch) -> None:
    """Path keys of the spec file are expanded (the `head` configuration has no nanospec block, and vLLM expands
    nothing); a server that does not start becomes an entry of `errors`, the other configurations still run, the
    JSON is written, and the exit code says so."""
    import json

    from nanospec_vllm.tools import server as server_mod
    from nanospec_vllm.tools.bench import serve_load

    monkeypatch.setenv("NANOSPEC_CACHE", "/cache-here")
    spec = tmp_path / "spec.yaml"
    spec.write_text("method: eagle3\nmodel: ${NANOSPEC_CACHE:-~/x}/heads/h\nnum_speculative_tokens: 3\nnanospec: {}\n")
    started = []

    class FakeServer:
        def __init__(self, model, args, log, env=None, timeout=0):
            cfg = json.loads(args[args.index("--speculative-config") + 1]) if "--speculative-config" in args else None
            started.append(cfg)
            if cfg is not None and "nanospec" not in cfg:
                raise RuntimeError("server exited rc=1: boom")
            self.base = "http://127.0.0.1:1"

        def stop(self):
            pass

    monkeypatch.setattr(server_mod, "ServeProcess", FakeServer)
    monkeypatch.setattr(serve_load, "_client", lambda *a, **k: {
        "completed": 2, "output_throughput": 10.0, "request_throughput": 1.0, "median_tpot_ms": 5.0,
        "median_ttft_ms": 7.0})
    monkeypatch.setattr(serve_load, "_prompts", lambda source, n, seed: ["a", "b"])
    out = tmp_path / "r.json"
    rc = serve_load.main(["--model", str(tmp_path), "--spec", str(spec), "--configs", "no-spec,head,nanospec", "--concurrency", "1",
                          "--out", str(out)])
    assert rc == 1
    res = json.loads(out.read_text())
    assert [r["config"] for r in res["rows"]] == ["no-spec", "nanospec"]
    assert [e["config"] for e in res["errors"]] == ["head"] and "boom" in res["errors"][0]["error"]
    assert started[1]["model"] == "/cache-here/heads/h" == started[2]["model"]


def test_configs_split_keeps_a_schedule_whole() -> None:
    from nanospec_vllm.tools.bench.serve_load import split_configs

    assert split_configs("no-spec,head,nanospec@1-2:3,3-256:0,nanospec") == [
        "no-spec", "head", "nanospec@1-2:3,3-256:0", "nanospec"]
    assert split_configs(" no-spec , nanospec@1-1:3 ") == ["no-spec", "nanospec@1-1:3"]
