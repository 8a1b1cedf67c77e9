"""The pure parts of ``nanospec bench e2e`` (no vLLM, no models): task loading, configuration resolution,
aggregation over repeats and markdown rendering."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nanospec_vllm.tools.bench import e2e

ROOT = Path(__file__).resolve().parents[2]


def _write_spec_bench(path: Path) -> Path:
    rows = []
    for cat in e2e.MT_BENCH_CATEGORIES:
        rows += [{"category": cat, "turns": [f"{cat}-{i} first", f"{cat}-{i} second"]} for i in range(2)]
    for cat in ("translation", "summarization", "qa", "math_reasoning", "rag"):
        rows += [{"category": cat, "turns": [f"{cat}-{i}"]} for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_load_tasks_groups_counts_and_mt_bench_spread(tmp_path):
    sb = _write_spec_bench(tmp_path / "q.jsonl")
    groups = e2e.load_tasks(sb, limit=3)
    assert [g["task"] for g in groups] == list(e2e.TASK_GROUPS)
    assert all(len(g["prompts"]) == 3 for g in groups)
    by = {g["task"]: g["prompts"] for g in groups}
    # first turn only; mt_bench round-robin over its sub-categories in their order
    assert by["mt_bench"] == ["writing-0 first", "roleplay-0 first", "reasoning-0 first"]
    assert by["qa"] == ["qa-0", "qa-1", "qa-2"]
    assert all(p.startswith(e2e.HUMANEVAL_INSTRUCTION) and "def " in p for p in by["humaneval"])
    # more than the 8 sub-categories: the second question of each comes next
    mt = e2e.load_tasks(sb, limit=10, groups=["mt_bench"])[0]["prompts"]
    assert len(set(mt)) == 10 and mt[8:] == ["writing-1 first", "roleplay-1 first"]
    only = e2e.load_tasks(sb, limit=1, groups=["rag", "humaneval"])
    assert [(g["task"], len(g["prompts"])) for g in only] == [("rag", 1), ("humaneval", 1)]


def test_load_tasks_real_spec_bench_when_present():
    if not e2e.DEFAULT_SPEC_BENCH.is_file():
        pytest.skip(f"no Spec-Bench file at {e2e.DEFAULT_SPEC_BENCH}")
    groups = e2e.load_tasks(e2e.DEFAULT_SPEC_BENCH, limit=8, groups=list(e2e.SPEC_BENCH_GROUPS))
    assert [len(g["prompts"]) for g in groups] == [8] * 6
    assert len(set(groups[0]["prompts"])) == 8  # one from each MT-bench sub-category


def test_load_tasks_errors(tmp_path):
    with pytest.raises(e2e.BenchError, match="unknown task group"):
        e2e.load_tasks(tmp_path / "q.jsonl", groups=["mtbench"])
    with pytest.raises(e2e.BenchError, match="NANOSPEC_SPEC_BENCH"):
        e2e.load_tasks(tmp_path / "missing.jsonl", groups=["qa"])


def test_prompt_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "task": "x"}\n{"prompt": "b"}\n\n{"prompt": "c", "task": "x"}\n')
    assert e2e.load_prompt_file(f, limit=5) == [{"task": "x", "prompts": ["a", "c"]},
                                                {"task": "custom", "prompts": ["b"]}]
    assert e2e.load_prompt_file(f, limit=1)[0]["prompts"] == ["a"]
    f.write_text('{"text": "a"}\n')
    with pytest.raises(e2e.BenchError, match=r"p.jsonl:1"):
        e2e.load_prompt_file(f, limit=1)


def test_resolve_named_configs(tmp_path):
    assert e2e.resolve_config("no-spec") == {"name": "no-spec", "method": None, "nanospec": None}
    assert e2e.resolve_config("full-head", "eagle3")["method"] == "eagle3"
    shipped = e2e.shipped_nanospec_block()
    ns = e2e.resolve_config("nanospec")
    assert ns["method"] == "draft_model"
    for k, v in shipped.items():  # the shipped file, read now, with every key validated
        assert ns["nanospec"][k] == (list(v) if isinstance(v, tuple) else v), k
    paper = e2e.resolve_config("paper")["nanospec"]
    assert (paper["target_topk"], paper["prompt_topk"], paper["add_draft_tokens"], paper["capacity"],
            paper["hot_set_path"]) == (3, True, True, 3072, None)
    spec = e2e.speculative_config(e2e.resolve_config("paper"), "/d", 5)
    assert spec == {"method": "draft_model", "model": "/d", "num_speculative_tokens": 5, "nanospec": paper}
    assert e2e.speculative_config(e2e.resolve_config("full-head"), "/d", 4) == {
        "method": "draft_model", "model": "/d", "num_speculative_tokens": 4}
    assert e2e.speculative_config(e2e.resolve_config("no-spec"), "/d", 4) is None


def test_resolve_aliases_and_variants(tmp_path):
    for alias, base in (("eagle-full", "full-head"), ("eagle-nanospec", "nanospec"), ("eagle-paper", "paper")):
        a, b = e2e.resolve_config(alias, "draft_model"), e2e.resolve_config(base, "eagle")
        assert a["method"] == "eagle" and a["nanospec"] == b["nanospec"] and a["name"] == alias
    v = e2e.resolve_config("nanospec:target_topk=16;capacity=4096;prompt_topk=true")
    base = e2e.resolve_config("nanospec")["nanospec"]
    assert v["nanospec"] == dict(base, target_topk=16, capacity=4096, prompt_topk=True)
    assert e2e.resolve_config("paper:always_active_ids=[5,7]")["nanospec"]["always_active_ids"] == [5, 7]
    assert e2e.split_configs("no-spec, nanospec:always_active_ids=[1,2];target_topk=8,paper") == [
        "no-spec", "nanospec:always_active_ids=[1,2];target_topk=8", "paper"]
    with pytest.raises(e2e.BenchError, match="unknown config"):
        e2e.resolve_config("eagle-no-spec")
    with pytest.raises(e2e.BenchError, match="unknown config"):
        e2e.resolve_config("nano")
    with pytest.raises(e2e.BenchError, match="only NanoSpec configurations"):
        e2e.resolve_config("full-head:capacity=5")
    with pytest.raises(e2e.BenchError, match="KEY=VAL"):
        e2e.resolve_config("nanospec:capacity")
    with pytest.raises(e2e.BenchError, match=r"target_topk"):
        e2e.resolve_config("nanospec:target_topk=-1")
    with pytest.raises(e2e.BenchError, match=r"unknown key"):
        e2e.resolve_config("nanospec:topk=3")


def test_static_32k(tmp_path):
    missing = tmp_path / "none.txt"
    with pytest.raises(e2e.BenchError) as ei:
        e2e.resolve_config("static-32k", hot_set=missing)
    assert str(missing) in str(ei.value) and "nanospec build-hot-set" in str(ei.value)
    with pytest.raises(e2e.BenchError, match="nanospec build-hot-set"):
        e2e.resolve_config("eagle-static-32k", hot_set=missing)
    ranked = tmp_path / "hot.txt"
    ranked.write_text("\n".join(str(i) for i in range(40_000)) + "\n")
    cfg = e2e.resolve_config("static-32k", hot_set=ranked)["nanospec"]
    assert (cfg["hot_set_path"], cfg["hot_set_size"], cfg["capacity"], cfg["target_topk"], cfg["seed_from_prompt"],
            cfg["add_draft_tokens"]) == (str(ranked), 32768, 32769, 0, False, False)
    assert e2e.resolve_config("eagle-static-32k", hot_set=ranked)["method"] == "eagle"


def _rep(rnd, tps, **kw):
    base = {"round": rnd, "tokens_per_s": tps, "tau": None, "accept_rate": None, "coverage": None,
            "mean_active": None, "draft_ms_per_step": None, "step_ms": 10.0, "steps": 5, "tokens": 8,
            "wall_s": 8 / tps, "requests": 1, "output_hash": "h"}
    base.update(kw)
    return base


def test_aggregate_medians_and_paired_ratios():
    reps = {
        ("qa", "no-spec", "none", 1, 0): [_rep(0, 10.0), _rep(1, 20.0), _rep(2, 12.0)],
        ("qa", "full-head", "draft_model", 1, 4): [_rep(0, 20.0, tau=3.0), _rep(1, 40.0, tau=3.0),
                                                   _rep(2, 24.0, tau=3.5)],
        ("qa", "nanospec", "draft_model", 1, 4): [_rep(0, 10.0, tau=2.0, coverage=0.5),
                                                 _rep(1, 30.0, tau=2.5, coverage=0.7),
                                                 _rep(2, 18.0, tau=2.0, coverage=0.6, output_hash="other")],
    }
    rows = {r["config"]: r for r in e2e.aggregate(reps)}
    assert rows["no-spec"]["tokens_per_s"] == 12.0 and rows["no-spec"]["speed_vs_no_spec"] == 1.0
    fh, ns = rows["full-head"], rows["nanospec"]
    assert fh["tau"] == 3.0 and fh["speed_vs_full_head"] == 1.0 and fh["speed_vs_no_spec"] == 2.0
    # per-round ratios 0.5, 0.75, 0.75 -> median 0.75 (the ratio of medians would be 18/24 = 0.75 too; check rounds)
    assert [r["speed_vs_full_head"] for r in ns["repeats"]] == [0.5, 0.75, 0.75]
    assert ns["speed_vs_full_head"] == 0.75 and ns["coverage"] == 0.6 and ns["tau"] == 2.0
    assert ns["output_hash"] == ["h", "other"]  # differing repeats are visible
    assert len(ns["repeats"]) == 3 and ns["k"] == 4 and ns["batch"] == 1 and ns["method"] == "draft_model"
    summ = {s["config"]: s for s in e2e.summarize(list(rows.values()))}
    assert summ["nanospec"]["task"] == "median" and summ["nanospec"]["speed_vs_full_head"] == 0.75


def test_aggregate_break_even_coverage_pairs_rounds():
    """Each NanoSpec repeat's break-even coverage comes from the full-head repeat of the same round (tau, step ms)
    and its own step ms; the row holds the median. Rows without coverage (no NanoSpec) have none."""
    from nanospec_vllm.tools.breakeven import break_even_coverage

    reps = {
        ("qa", "full-head", "draft_model", 1, 4): [_rep(0, 20.0, tau=3.0, step_ms=10.0),
                                                   _rep(1, 20.0, tau=2.0, step_ms=10.0)],
        ("qa", "nanospec", "draft_model", 1, 4): [_rep(0, 20.0, tau=2.8, coverage=0.9, step_ms=8.0),
                                                 _rep(1, 20.0, tau=1.9, coverage=0.9, step_ms=12.0,
                                                      guarded_share=0.25, guard_fires=2)],
    }
    rows = {r["config"]: r for r in e2e.aggregate(reps)}
    ns = rows["nanospec"]
    assert [r["break_even_coverage"] for r in ns["repeats"]] == [break_even_coverage(3.0, 10.0, 8.0, 4), 1.0]
    assert 0.0 < ns["repeats"][0]["break_even_coverage"] < 1.0
    assert rows["full-head"]["break_even_coverage"] is None
    assert ns["guarded_share"] == 0.25 and ns["guard_fires"] == 2  # medians over the repeats that report them


def test_aggregate_eagle_alias_pairs_with_eagle_full():
    reps = {("qa", "eagle-full", "eagle", 1, 4): [_rep(0, 10.0)],
            ("qa", "eagle-nanospec", "eagle", 1, 4): [_rep(0, 15.0)],
            ("qa", "full-head", "draft_model", 1, 4): [_rep(0, 100.0)]}
    rows = {r["config"]: r for r in e2e.aggregate(reps)}
    assert rows["eagle-nanospec"]["speed_vs_full_head"] == 1.5
    assert rows["eagle-nanospec"]["speed_vs_no_spec"] is None


def test_group_metrics():
    g = {"wall_s": 2.0, "n_tokens": 40, "outputs": [[1, 2], [3]],
         "spec": {"vllm:spec_decode_num_drafts": 10, "vllm:spec_decode_num_accepted_tokens": 15,
                  "vllm:spec_decode_num_draft_tokens": 40},
         "nanospec": {"target": 20, "covered": 15, "size_sum": 1000, "size_n": 10},
         "timers": {"steps": 10, "execute_s": 0.5, "sample_s": 0.5, "propose_s": 0.3}}
    m = e2e.group_metrics(g, spec=True)
    assert m["tokens_per_s"] == 20.0 and m["tau"] == 2.5 and m["accept_rate"] == 0.375
    assert m["coverage"] == 0.75 and m["mean_active"] == 100.0
    assert (m["drafted"], m["covered"]) == (20, 15)
    assert m["draft_ms_per_step"] == pytest.approx(30.0) and m["step_ms"] == pytest.approx(100.0)
    assert m["requests"] == 2 and m["output_hash"] == e2e.output_hash([[1, 2], [3]])
    none = e2e.group_metrics(dict(g, nanospec=None, spec={}), spec=False)
    assert none["tau"] is None and none["coverage"] is None and none["draft_ms_per_step"] is None
    assert none["drafted"] is None and none["covered"] is None


def test_check_identity():
    def res(outs):
        return {"groups": [{"task": "qa", "batch": 1, "outputs": outs}]}

    raw = {("no-spec", "none", 0): {0: res([[1, 2, 3]]), 1: res([[1, 2, 3]])},
           ("nanospec", "draft_model", 4): {0: res([[1, 2, 3]]), 1: res([[1, 9, 3]])}}
    bad, checked = e2e.check_identity(raw)
    assert checked and len(bad) == 1
    assert bad[0]["config"] == "nanospec" and bad[0]["round"] == 1 and bad[0]["first_diff"] == 1
    assert bad[0]["against"] == "no-spec"  # no full-head twin in the run
    assert e2e.check_identity({("nanospec", "draft_model", 4): {0: res([[1]])}}) == ([], False)


def test_check_identity_against_the_twin_and_vllm_differences_apart():
    def res(outs):
        return {"groups": [{"task": "qa", "batch": 1, "outputs": outs}]}

    raw = {("no-spec", "none", 0): {0: res([[1, 2, 3], [4, 5]])},
           ("full-head", "draft_model", 4): {0: res([[1, 2, 7], [4, 5]])},  # vLLM's speculation differs
           ("nanospec", "draft_model", 4): {0: res([[1, 2, 7], [4, 5]])},  # equals its twin: fine
           ("paper", "draft_model", 4): {0: res([[1, 2, 7], [4, 6]])},  # differs from its twin
           ("eagle-full", "eagle", 3): {0: res([[1, 2, 3], [4, 5]])},
           ("eagle-nanospec", "eagle", 3): {0: res([[1, 2, 3], [4, 5]])},
           ("nanospec", "draft_model", 6): {0: res([[1, 2, 3], [4, 5]])}}  # no K=6 twin: against no-spec
    bad, checked = e2e.check_identity(raw)
    ours, vllm = e2e.split_mismatches(bad)
    assert checked
    assert [(m["config"], m["against"], m["prompt"], m["first_diff"]) for m in ours] == [("paper", "full-head", 1, 1)]
    assert [(m["config"], m["against"], m["prompt"], m["first_diff"]) for m in vllm] == [("full-head", "no-spec", 0, 2)]


FIXED = {
    "header": {"command": "nanospec bench e2e --x", "date": "2026-01-01", "machine": {"cpu": "cpu", "cpu_count": 2},
               "models": {"target": "t", "draft": "d"}, "settings": {"max_tokens": 8, "repeats": 1},
               "versions": {}},
    "rows": [
        {"task": "qa", "config": "no-spec", "method": "none", "batch": 1, "k": 0, "tokens_per_s": 10.0,
         "tau": None, "coverage": None, "mean_active": None, "draft_ms_per_step": None, "step_ms": 100.0,
         "speed_vs_full_head": None, "speed_vs_no_spec": 1.0},
        {"task": "qa", "config": "full-head", "method": "draft_model", "batch": 1, "k": 4, "tokens_per_s": 20.0,
         "tau": 3.0, "coverage": None, "mean_active": None, "draft_ms_per_step": 50.0, "step_ms": 150.0,
         "speed_vs_full_head": 1.0, "speed_vs_no_spec": 2.0},
        {"task": "qa", "config": "nanospec", "method": "draft_model", "batch": 1, "k": 4, "tokens_per_s": 15.0,
         "tau": 2.5, "coverage": 0.8125, "mean_active": 123.4, "draft_ms_per_step": 40.0, "step_ms": 140.0,
         "speed_vs_full_head": 0.75, "speed_vs_no_spec": 1.5},
    ],
}


def test_render_markdown_from_fixed_json(tmp_path, capsys):
    md = e2e.render_markdown(FIXED)
    assert "## draft_model, K=4, batch 1" in md
    head = next(line for line in md.splitlines() if line.startswith("| task |"))
    assert head.startswith("| task | no-spec tok/s | no-spec step ms | full-head tok/s | full-head tau |")
    assert "nanospec coverage | nanospec mean active | nanospec draft ms/step" in head
    assert "no-spec coverage" not in head and "full-head coverage" not in head
    assert "| qa | 10.00 | 100.0 | 20.00 | 3.00 | 50.0 | 150.0 | 1.00x | 15.00 | 2.50 | 81.2% | 123 | 40.0 | " \
           "140.0 | 0.75x |" in md
    assert "| **median** | 10.00 |" in md and "MISMATCH" not in md
    f = tmp_path / "r.json"
    f.write_text(json.dumps(dict(FIXED, mismatches=[{"config": "nanospec"}])))
    assert e2e.main(["--markdown", str(f)]) == 0
    out = capsys.readouterr().out
    assert "## draft_model, K=4, batch 1" in out and "1 OUTPUT MISMATCHES" in out
    assert e2e.main(["--markdown", str(f), "--compact"]) == 0
    head = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| task |"))
    assert "nanospec coverage | nanospec mean active | nanospec speed vs full-head" in head
    assert "step ms" not in head and "draft ms/step" not in head


def test_cli_dispatch_and_bad_options(capsys):
    from nanospec_vllm import cli

    assert cli.main(["bench", "e2e", "--k", "0", "--model", str(ROOT), "--draft", str(ROOT)]) == 2
    assert "--k" in capsys.readouterr().err
    assert cli.main(["bench", "e2e", "--configs", "bogus", "--model", str(ROOT), "--draft", str(ROOT),
                     "--prompts", str(ROOT / "nope.jsonl")]) == 2
    assert "prompt file not found" in capsys.readouterr().err


def test_plot_from_fixed_json(tmp_path, capsys):
    f = tmp_path / "r.json"
    f.write_text(json.dumps(FIXED))
    png = tmp_path / "plots" / "r.png"
    assert e2e.main(["--markdown", str(f), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_preload_iomp_replaces_gnu_openmp(monkeypatch):
    """vLLM's CPU platform adds torch's libgomp to LD_PRELOAD of a process that built an engine config; a child
    with both OpenMP runtimes preloaded fails vLLM's multiprocess executor (assert not (use_iomp and use_gomp))."""
    from nanospec_vllm.tools import engine

    monkeypatch.setattr(engine, "find_iomp", lambda: "/venv/lib/libiomp5.so")
    env = {"LD_PRELOAD": "/venv/lib/python3.11/site-packages/torch.libs/libgomp-a34b3233.so.1:/x/libtcmalloc.so"}
    assert engine.preload_iomp(env) == "/venv/lib/libiomp5.so"
    assert env["LD_PRELOAD"] == "/venv/lib/libiomp5.so:/x/libtcmalloc.so"
    engine.preload_iomp(env)  # idempotent
    assert env["LD_PRELOAD"] == "/venv/lib/libiomp5.so:/x/libtcmalloc.so"
    empty: dict[str, str] = {}
    engine.preload_iomp(empty)
    assert empty["LD_PRELOAD"] == "/venv/lib/libiomp5.so"
    monkeypatch.setattr(engine, "find_iomp", lambda: None)
    untouched = {"LD_PRELOAD": "/x/libgomp.so"}
    assert engine.preload_iomp(untouched) is None and untouched == {"LD_PRELOAD": "/x/libgomp.so"}


def test_check_identity_fails_on_a_missing_output():
    """Fewer outputs than the reference (a prompt, a (task, batch) group, or every round) is a failure, not a
    pass: ``zip`` over the outputs would otherwise compare only what both have."""
    def res(outs, task="qa"):
        return {"groups": [{"task": task, "batch": 1, "outputs": outs}]}

    def ours(raw):
        bad, checked = e2e.check_identity(raw)
        assert checked
        return [(m["config"], m["against"], m["task"], m["prompt"], m.get("missing")) for m in
                e2e.split_mismatches(bad)[0]]

    base = {("no-spec", "none", 0): {0: res([[1, 2], [3, 4]])},
            ("full-head", "draft_model", 4): {0: res([[1, 2], [3, 4]])}}
    assert ours({**base, ("nanospec", "draft_model", 4): {0: res([[1, 2], [3, 4]])}}) == []
    # one prompt's output missing
    assert ours({**base, ("nanospec", "draft_model", 4): {0: res([[1, 2]])}}) == [
        ("nanospec", "full-head", "qa", 1, "output")]
    # the reference is the shorter one
    assert ours({**base, ("nanospec", "draft_model", 4): {0: res([[1, 2], [3, 4], [5]])}}) == [
        ("nanospec", "full-head", "qa", 2, "reference")]
    # a whole task group missing (and one the reference never ran)
    assert ours({**base, ("nanospec", "draft_model", 4): {0: res([[1, 2], [3, 4]], task="rag")}}) == [
        ("nanospec", "full-head", "qa", None, "output"), ("nanospec", "full-head", "rag", None, "reference")]
    # an engine with no output at all: its twin would be the reference
    assert ours({**base, ("nanospec", "draft_model", 4): {}}) == [
        ("nanospec", "full-head", None, None, "all outputs")]
    # a full-head engine with a missing output fails too (not a vLLM speculation difference)
    bad, _ = e2e.check_identity({("no-spec", "none", 0): {0: res([[1, 2], [3, 4]])},
                                 ("full-head", "draft_model", 4): {0: res([[1, 2]])}})
    failures, vllm = e2e.split_mismatches(bad)
    assert [m["missing"] for m in failures] == ["output"] and vllm == []


def test_run_exits_3_on_a_missing_output(monkeypatch, tmp_path, capsys):
    """End to end through ``run`` with fake engines: the NanoSpec engine returns one output fewer."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')

    def fake_engine(job, workdir, tag, timeout):
        outs = [[1, 2, 3], [4, 5]]
        if (job["spec"] or {}).get("nanospec") is not None:
            outs = outs[:1]
        groups = [{"task": g["task"], "batch": b, "wall_s": 1.0, "outputs": outs,
                   "n_tokens": sum(map(len, outs)), "spec": {}, "nanospec": None, "timers": {"steps": 1,
                   "execute_s": 0.1, "sample_s": 0.1, "propose_s": 0.0}} for b in job["batches"] for g in job["groups"]]
        return {"startup_s": 1.0, "groups": groups}

    monkeypatch.setattr(e2e.job, "run_engine", fake_engine)
    args = ["--model", str(ROOT), "--draft", str(ROOT), "--prompts", str(prompts), "--batch", "2", "--repeats", "1",
            "--configs", "no-spec,full-head,nanospec", "--iomp", "off", "--json", str(tmp_path / "r.json")]
    assert e2e.main(args) == 3
    err = capsys.readouterr().err
    assert "1 OUTPUTS MISSING" in err and "DIFFER" not in err
    data = json.loads((tmp_path / "r.json").read_text())
    assert [(m["config"], m["prompt"], m["missing"]) for m in data["mismatches"]] == [("nanospec", 1, "output")]


class _BaseTokenizer:
    """A base model's tokenizer: no chat template, and ``apply_chat_template`` fails as Hugging Face's does."""

    chat_template = None

    def apply_chat_template(self, *a, **k):
        raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set")

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


class _ChatTokenizer(_BaseTokenizer):
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return "<u>" + messages[0]["content"] + "</u>"


def test_prompt_ids_without_a_chat_template_sends_the_raw_prompt():
    base, chat = _BaseTokenizer(), _ChatTokenizer()
    assert not e2e.has_chat_template(base) and e2e.has_chat_template(chat)
    assert e2e.prompt_ids(base, "hi") == [1, ord("h"), ord("i")]  # as /v1/completions encodes it
    assert e2e.prompt_ids(chat, "hi") == [ord(c) for c in "<u>hi</u>"]  # the template adds what it needs


def test_engine_job_on_a_model_without_a_chat_template(monkeypatch, tmp_path):
    """The engine side with a fake ``vllm`` whose tokenizer has no chat template: it generates from the raw
    prompts and says so in its result (the parent puts it in the JSON header)."""
    import sys
    from types import ModuleType
    from types import SimpleNamespace as NS

    seen = []

    class LLM:
        def __init__(self, **kwargs):
            runner = NS(device="cpu", execute_model=lambda *a: None, sample_tokens=lambda *a: None,
                        propose_draft_token_ids=lambda *a: None)
            self.llm_engine = NS(collective_rpc=lambda fn: [fn(NS(model_runner=runner))])

        def get_tokenizer(self):
            return _BaseTokenizer()

        def get_metrics(self):
            return []

        def generate(self, prompts, params, use_tqdm):
            seen.extend(p["prompt_token_ids"] for p in prompts)
            return [NS(outputs=[NS(token_ids=[7, 8])]) for _ in prompts]

    vllm = ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, lambda **k: NS(**k)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "VLLM_HOST_IP", "HF_HUB_OFFLINE",
              "VLLM_NO_USAGE_STATS"):
        monkeypatch.setenv(k, os.environ.get(k, ""))  # restored afterwards
    job = {"model": "base", "spec": None, "groups": [{"task": "t", "prompts": ["ab"]}], "batches": [1],
           "max_tokens": 4, "max_num_seqs": 1, "max_model_len": 64, "kv_cache_gib": 1, "out": str(tmp_path / "o")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert e2e.engine_main(str(tmp_path / "job.json")) == 0
    res = json.loads((tmp_path / "o").read_text())
    assert res["chat_template"] is False
    assert res["groups"][0]["outputs"] == [[7, 8]] and [1, ord("a"), ord("b")] in seen


def test_run_records_a_missing_chat_template_in_the_header(monkeypatch, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')

    def fake_engine(job, workdir, tag, timeout):
        groups = [{"task": "custom", "batch": 1, "wall_s": 1.0, "outputs": [[1]], "n_tokens": 1, "spec": {},
                   "nanospec": None, "timers": {"steps": 1, "execute_s": 0.1, "sample_s": 0.1, "propose_s": 0.0}}]
        return {"startup_s": 1.0, "chat_template": False, "groups": groups}

    monkeypatch.setattr(e2e.job, "run_engine", fake_engine)
    out = tmp_path / "r.json"
    assert e2e.main(["--model", str(ROOT), "--draft", str(ROOT), "--prompts", str(prompts), "--batch", "1",
                     "--repeats", "1", "--configs", "no-spec", "--iomp", "off", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["header"]["settings"]["chat_template"] is False
    assert f"{ROOT.name} has no chat template" in capsys.readouterr().err


def test_mix_groups_round_robin_keeps_every_prompt_once():
    groups = [{"task": "a", "prompts": ["a1", "a2", "a3"]}, {"task": "b", "prompts": ["b1"]},
              {"task": "c", "prompts": ["c1", "c2"]}]
    (mixed,) = e2e.mix_groups(groups)
    assert mixed == {"task": "mixed", "prompts": ["a1", "b1", "c1", "a2", "c2", "a3"]}
    assert e2e.mix_groups([]) == [{"task": "mixed", "prompts": []}]
    assert e2e.mix_groups(groups, 4)[0]["prompts"] == ["a1", "b1", "c1", "a2"]
    with pytest.raises(e2e.BenchError, match="only 6 prompts"):
        e2e.mix_groups(groups, 7)
