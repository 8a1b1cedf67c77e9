"""``nanospec bench soak`` at test size on a real server: the 0.5B drafting for itself, 4 clients for 45 s of
mixed requests (both endpoints, streaming, NanoSpec on and off, disconnects, client-timeout aborts) on a KV cache
of 6 blocks (the default), so that requests are preempted. The command must pass every check (exit 0): greedy
outputs with NanoSpec equal to the switch-off outputs, no 5xx or other failure, /health, slots and running
requests back to 0, bounded memory growth, and every path exercised. The report's counts are checked for
consistency."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.e2e


def test_soak_test_sized(qwen05b, tmp_path):
    out, log = tmp_path / "soak.json", tmp_path / "server.log"
    cmd = [sys.executable, "-m", "nanospec_vllm.cli", "bench", "soak", "--model", str(qwen05b), "--duration", "45",
           "--concurrency", "4", "--seed", "1", "--json", str(out), "--log", str(log)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:] + (log.read_text()[-3000:] if log.exists() else "")
    r = json.loads(out.read_text())
    assert r["passed"] is True and all(r["checks"].values()) and len(r["checks"]) == 7
    assert r["drive_s"] >= 45 and r["header"]["concurrency"] == 4
    assert r["requests"] == sum(r["by_status"].values()) == sum(r["by_kind"].values())
    assert r["requests"] == r["completed"] + r["disconnects"] + r["aborts"]  # nothing else on a clean run
    assert r["completed"] > 0 and r["disconnects"] > 0 and r["aborts"] > 0 and r["preemptions"] > 0
    assert r["errors_5xx"] == r["errors_4xx"] == r["errors_other"] == r["mismatches"] == 0
    assert r["compared_nanospec_on"] > 0 and r["compared"] >= r["compared_nanospec_on"]
    assert 0 < r["nanospec_on"] < r["requests"]
    assert r["slots_in_use_end"] == 0 and r["running_end"] == 0 and r["healthy_end"] is True
    assert r["rss_start_mb"] > 500 and r["rss_growth_mb"] <= r["max_rss_growth_mb"]
    assert r["header"]["prompts"]["source"] == "calibration" and r["header"]["prompts"]["used"] > 0
