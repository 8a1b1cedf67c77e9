"""``nanospec bench kernels --quick`` runs on CPU, writes sane JSON rows, and needs nothing but torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from nanospec_vllm.ops import native
from nanospec_vllm.tools.bench import kernels as bench

ROOT = Path(__file__).resolve().parents[2]


def test_quick_cpu_writes_rows(tmp_path, capsys) -> None:
    out = tmp_path / "k.json"
    assert bench.main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    h = data["header"]
    assert h["command"] == f"nanospec bench kernels --device cpu --quick --json {out}"
    assert h["versions"]["torch"] and h["machine"]["cpu_count"] >= 1 and h["settings"]["flush"] is True
    rows = data["rows"]
    impls = {"dense", "dense-masked", "torch"} | ({"native"} if native.is_available() else set())
    assert {r["impl"] for r in rows} == impls
    q = bench.QUICK
    shapes = {(r["hidden"], r["vocab"], r["batch"], r["active"]) for r in rows}
    H, V = bench.HEADS[q["heads"][0]]
    assert shapes == {(H, V, b, a) for b in q["batches"] for a in q["actives"]}
    assert len(rows) == len(impls) * len(shapes)
    for r in rows:
        assert r["device"] == "cpu" and r["mode"] == "eager" and r["error"] is None
        assert math.isfinite(r["median_us"]) and 0 < r["median_us"] < 10e6 and r["reps"] >= 3
        assert r["speedup_vs_dense"] > 0
        if r["impl"] == "dense":
            assert r["speedup_vs_dense"] == 1.0
        if r["impl"] in bench.EXACT:  # every timed sparse impl returned the reference's tokens
            assert r["tokens_match"] == 1.0, r
    assert h["wrong_tokens"] == []
    # the dense head does not depend on the active set: one measurement per batch, reused
    for b in q["batches"]:
        assert len({r["median_us"] for r in rows if r["impl"] == "dense" and r["batch"] == b}) == 1
    assert {(c["head"], c["active"]) for c in data["summary"]["crossover"]} == {(q["heads"][0], a)
                                                                               for a in q["actives"]}
    printed = capsys.readouterr().out
    assert "median us (speedup vs dense)" in printed and "stops beating dense" in printed
    assert bench.main(["--markdown", str(out)]) == 0
    md = capsys.readouterr().out
    assert "| batch | active | dense |" in md and md.count("\n| 1 | ") == len(q["actives"])


def test_bench_imports_only_torch() -> None:
    """The H200 run has only torch + triton: the bench must not pull in vLLM, pydantic, yaml or the config."""
    code = ("import sys, nanospec_vllm.tools.bench.kernels as k; "
            "bad = [m for m in ('vllm', 'pydantic', 'yaml', 'nanospec_vllm.config', 'nanospec_vllm.state') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_wrong_tokens_fail_the_run(tmp_path, monkeypatch) -> None:
    """An implementation that returns other tokens than the reference is reported and fails the run."""
    good = bench._impls

    def impls(device):
        out = good(device)
        out["torch"] = lambda h, w, i, c: (None, bench.raw_reference(h, w, i, c)[1] + 1, None)  # off by one id
        return out

    monkeypatch.setattr(bench, "_impls", impls)
    out = tmp_path / "k.json"
    try:
        bench.main(["--device", "cpu", "--quick", "--json", str(out)])
    except RuntimeError as e:
        assert "torch B=" in str(e)
    else:
        raise AssertionError("a wrong implementation was not caught")
    assert json.loads(out.read_text())["header"]["wrong_tokens"]
