"""`nanospec bench coverage` end to end on a toy size: the real 0.5B as target and drafter, 2 prompts, 8 tokens.

Checks the report's structure, that a policy activating every id agrees with the full head everywhere (coverage,
agreement and tau ratio exactly 1), and that a tiny policy (special ids + emitted tokens only) does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

TINY = "topk-0+nodraft+noprompt"


def test_bench_coverage_toy(qwen05b: Path, tmp_path: Path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"task": "code", "prompt": "Write a Python function that returns the n-th Fibonacci number."},
        {"task": "chat", "prompt": "Name three colours of the rainbow."},
    ]) + "\n")
    out = tmp_path / "cov.json"
    env = dict(os.environ, NANOSPEC_CACHE=str(tmp_path / "cache"), VLLM_HOST_IP="127.0.0.1", HF_HUB_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1")
    cmd = [sys.executable, "-m", "nanospec_vllm.tools.bench.coverage", "--model", str(qwen05b), "--draft",
           str(qwen05b), "--prompts", str(prompts), "--max-tokens", "8", "--k", "4", "--policies", f"all,{TINY}",
           "--json", str(out)]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1200, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rep = json.loads(out.read_text())
    assert set(rep) == {"header", "summary", "rows"}
    assert rep["header"]["k"] == 4 and rep["header"]["prompts_per_group"]["ALL"] == 2
    summ = rep["summary"]
    assert set(summ) == {"all", TINY}
    for pol in summ.values():
        assert set(pol) == {"code", "chat", "ALL"}
        for g in pol.values():
            for key in ("mean_size", "p95_size", "coverage", "coverage_pos", "agreement", "tau_sparse", "tau_full",
                        "tau_ratio", "misses", "miss_share"):
                assert key in g
            assert len(g["coverage_pos"]) == 4
    a = summ["all"]["ALL"]
    assert a["drafted"] > 0
    assert a["agreement"] == 1.0 and a["coverage"] == 1.0 and a["tau_ratio"] == 1.0
    assert a["mean_size"] >= 151_000
    t = summ[TINY]["ALL"]
    assert t["agreement"] < 1.0 and t["coverage"] < 1.0 and t["mean_size"] < 100
    assert sum(t["misses"].values()) == t["drafted"] - round(t["coverage"] * t["drafted"])
    rows = rep["rows"]
    assert len(rows) == 4
    for r in rows:
        assert {"task", "policy", "drafted", "covered", "key"} <= set(r)
    # a second run is served from the cache (no engine): fast and identical
    p2 = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=env)
    assert p2.returncode == 0 and "to compute" not in p2.stderr
    assert json.loads(out.read_text())["summary"] == summ
