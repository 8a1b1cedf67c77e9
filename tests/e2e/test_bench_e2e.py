"""``nanospec bench e2e`` at toy size on the real engine: the Qwen2.5-Coder-0.5B as both target and drafter, two
made-up prompts, 8 tokens, 1 repeat, no-spec / full-head / nanospec; plus the real task loader (HumanEval, 1
prompt). Checks the JSON rows, the measured ranges, output identity and the markdown rendering."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nanospec_vllm.tools.bench import e2e

pytestmark = pytest.mark.e2e
FIELDS = {"task", "config", "method", "batch", "k", "tokens_per_s", "tau", "coverage", "mean_active",
          "draft_ms_per_step", "step_ms", "repeats", "output_hash", "speed_vs_full_head"}


def _bench(args: list[str], tmp_path) -> tuple[dict, subprocess.CompletedProcess]:
    out = tmp_path / f"bench-{len(list(tmp_path.iterdir()))}.json"
    cmd = [sys.executable, "-m", "nanospec_vllm.cli", "bench", "e2e", "--model", "qwen2.5-coder-0.5b",
           "--draft", "qwen2.5-coder-0.5b", "--max-tokens", "8", "--repeats", "1", "--kv-cache-gib", "1",
           "--json", str(out), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return json.loads(out.read_text()), p


def test_toy_run(qwen05b, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Write a Python function that returns the larger of two numbers.",
                                   "task": "code"}) + "\n"
                       + json.dumps({"prompt": "List three colours of the rainbow, one per line."}) + "\n")
    data, p = _bench(["--prompts", str(prompts), "--batch", "1,2", "--configs", "no-spec,full-head,nanospec"],
                     tmp_path)
    h = data["header"]
    assert h["identity_checked"] is True and data["mismatches"] == [] and data["errors"] == []
    assert h["models"]["target"] == "qwen2.5-coder-0.5b" and qwen05b.is_dir()
    assert h["versions"]["vllm"].startswith("vllm") and h["settings"]["ld_preload"] in (None, "libiomp5.so")
    assert h["configs"]["nanospec"]["nanospec"] == e2e.resolve_config("nanospec")["nanospec"]
    assert h["configs"]["full-head"]["nanospec"] is None and len(h["machine"]["load_end"]) == 3
    rows = data["rows"]
    # 2 task groups (code, custom) x 3 configs x 2 batch sizes
    assert len(rows) == 12 and {r["task"] for r in rows} == {"code", "custom"}
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and len(r["repeats"]) == 1
        assert r["requests"] == 1 and 0 < r["tokens"] <= 8
        if r["config"] == "no-spec":
            assert (r["method"], r["k"], r["tau"], r["coverage"], r["draft_ms_per_step"]) == ("none", 0, None,
                                                                                               None, None)
            continue
        assert r["method"] == "draft_model" and r["k"] == 4 and r["batch"] in (1, 2)
        assert r["tau"] >= 1.0 and r["draft_ms_per_step"] > 0 and r["draft_ms_per_step"] < r["step_ms"]
        if r["config"] == "full-head":
            assert r["coverage"] is None and r["mean_active"] is None and r["speed_vs_full_head"] == 1.0
        else:
            assert 0.0 <= r["coverage"] <= 1.0 and r["mean_active"] > 0
    # greedy: every configuration's outputs hash the same as no-spec's, per task and batch
    for task in ("code", "custom"):
        for b in (1, 2):
            assert len({r["output_hash"] for r in rows if r["task"] == task and r["batch"] == b}) == 1
    # the target drafting for itself: the full head's drafts are (nearly) all accepted
    assert max(r["tau"] for r in rows if r["config"] == "full-head") > 3.0
    assert "## draft_model, K=4, batch 1" in p.stdout
    md = subprocess.run([sys.executable, "-m", "nanospec_vllm.cli", "bench", "e2e", "--markdown",
                         h["command"].split("--json ")[1].split()[0]], capture_output=True, text=True, check=True)
    assert "| **median** |" in md.stdout and "nanospec coverage" in md.stdout and "## draft_model, K=4, batch 2" in \
        md.stdout


def test_real_task_loader(qwen05b, tmp_path):
    data, _ = _bench(["--tasks", "humaneval", "--limit", "1", "--batch", "1", "--configs", "no-spec,nanospec"],
                     tmp_path)
    assert data["header"]["settings"]["tasks"] == {"humaneval": 1} and data["mismatches"] == []
    assert {(r["task"], r["config"]) for r in data["rows"]} == {("humaneval", "no-spec"), ("humaneval", "nanospec")}


def test_random_weight_eagle_head_runs_through_the_bench(qwen05b, tmp_path):
    """A cost-only head (``train-eagle --random-weights``) for any target drafts in ``bench e2e --method eagle``:
    draft cost is measured with and without NanoSpec, NanoSpec's outputs equal the head's without it."""
    head = tmp_path / "random-head"
    p = subprocess.run([sys.executable, "-m", "nanospec_vllm.cli", "train-eagle", str(qwen05b), "--random-weights",
                        "--out", str(head)], capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0 and p.stdout.strip().endswith(str(head)), (p.stdout + p.stderr)[-3000:]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Write a haiku about the sea."}) + "\n")
    data, _ = _bench(["--prompts", str(prompts), "--batch", "1", "--method", "eagle", "--k", "2", "--draft", str(head),
                      "--configs", "eagle-full,eagle-nanospec"], tmp_path)
    assert data["mismatches"] == [] and data["errors"] == []
    rows = {r["config"]: r for r in data["rows"]}
    assert set(rows) == {"eagle-full", "eagle-nanospec"}
    for r in rows.values():
        assert r["method"] == "eagle" and r["k"] == 2 and r["draft_ms_per_step"] > 0
    assert rows["eagle-nanospec"]["mean_active"] > 0 and rows["eagle-full"]["mean_active"] is None
    assert rows["eagle-nanospec"]["output_hash"] == rows["eagle-full"]["output_hash"]


def test_break_even_guard_on_the_real_engine(qwen05b, tmp_path):
    """A small policy (no target top-k, no hot set) with ``guard_coverage: 1``: the first miss sends a request to
    the full head for good (release would need coverage 1.05). The guard fires, the guarded configuration gives
    the full head's outputs (the bench checks every NanoSpec configuration against ``full-head``) and accepts
    more than the same policy without the guard."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Explain in two sentences why the sky is blue.", "task": "chat"})
                       + "\n")
    small = "nanospec:target_topk=0;hot_set_path=null;hot_set_size=null;guard_coverage=0"  # the shipped file's is on
    guarded = small.replace("guard_coverage=0", "guard_coverage=1.0;guard_window=1")
    data, _ = _bench(["--prompts", str(prompts), "--batch", "1", "--max-tokens", "48",
                      "--configs", f"full-head,{small},{guarded}"], tmp_path)
    assert data["mismatches"] == [] and data["header"]["identity_checked"] is True
    rows = {r["config"]: r for r in data["rows"]}
    g, s = rows[guarded], rows[small]
    assert s["coverage"] < 1.0 and s["guarded_share"] == 0.0 and s["guard_fires"] == 0
    assert g["guard_fires"] >= 1 and 0.0 < g["guarded_share"] <= 1.0
    assert g["tau"] > s["tau"]
    assert 0.0 <= s["break_even_coverage"] <= 1.0
