"""The draft-step benchmark's CPU-runnable parts: toy-size run end to end (rows, figures, exact sparse tokens),
the ragged active sets, the byte accounting behind GB/s, the markdown tables, and that it imports nothing beyond
torch (it must run from a bare checkout on a GPU machine with torch + triton only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from nanospec_vllm.tools.bench import draft_step as ds

ROOT = Path(__file__).resolve().parents[2]


def test_quick_cpu_run_writes_every_row(tmp_path, capsys) -> None:
    out = tmp_path / "ds.json"
    assert ds.main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = [ds.Row(**r) for r in data["rows"]]
    assert data["header"]["bench"] == "draft_step" and data["header"]["device"] == "cpu"
    assert {(r.model, r.batch, r.kind) for r in rows} == {
        (m, b, k) for m in ds.TOY for b in ds.QUICK_BATCHES for k in ds.KINDS}
    assert all(r.error is None and r.ms > 0 and r.gbps > 0 and r.reps >= 3 for r in rows), rows
    for r in rows:
        if r.kind == "sparse":
            assert r.tokens_match == 1.0, "the sparse head must pick the fp32 argmax over the active ids"
            assert 48 <= r.active_mean <= 160
        if r.kind != "layer":
            assert r.head_ms is not None
        assert r.speedup_vs_dense is not None
    md = ds.markdown(data)
    assert md.count("| 1 |") == 2 and md.count("| 4 |") == 2 and "tokens match" in md
    assert "sparse head" in capsys.readouterr().out


def test_ragged_sets_are_distinct_in_range_and_padded() -> None:
    gen = torch.Generator().manual_seed(1)
    ids, counts = ds.ragged_sets(16, 500, 20, 60, torch.device("cpu"), gen)
    assert ids.shape == (16, 60) and ids.dtype == torch.int32 and counts.dtype == torch.int32
    assert int(counts.min()) >= 20 and int(counts.max()) <= 60 and len(set(counts.tolist())) > 1  # ragged
    for row, n in zip(ids.tolist(), counts.tolist()):
        live = row[:n]
        assert len(set(live)) == n and all(0 <= i < 500 for i in live) and row[n:] == [-1] * (60 - n)


def test_bytes_count_what_each_head_reads() -> None:
    s = ds.TOY["toy-qwen"]
    gen = torch.Generator().manual_seed(0)
    w = ds.Weights(s, torch.device("cpu"), torch.bfloat16, gen)
    ids, counts = ds.ragged_sets(3, s.vocab, 10, 30, torch.device("cpu"), gen)
    steps = {k: ds.DraftStep(s, w, 3, 8, k, ids, counts, "torch", gen) for k in ds.KINDS}
    layer = steps["layer"].bytes()
    assert steps["dense"].bytes() - layer == s.vocab * s.hidden * 2
    assert steps["sparse"].bytes() - layer == int(counts.sum()) * s.hidden * 2 + 3 * 30 * 4
    # the layer: fc (2H x H) + qkv (+bias) + o + gate/up + down + 3 norms, bf16; + embedding rows, hidden, K/V
    d, H = s.head_dim, s.hidden
    qkv = (s.heads + 2 * s.kv_heads) * d
    weights = 2 * (2 * H * H + qkv * H + qkv + H * s.heads * d + 3 * s.inter * H + 3 * H)
    assert layer == weights + 2 * (3 * H * 2) + 2 * 2 * (3 * s.kv_heads * 8 * d)
    for k, st in steps.items():  # every kind drafts the same layer output; sparse = argmax over the active ids
        tok = st().clone()
        if k == "sparse":
            x = st.final_hidden()
            assert torch.equal(tok, ds.reference_tokens(x, w.head, ids, counts))


def test_imports_nothing_beyond_torch() -> None:
    code = ("import sys, nanospec_vllm.tools.bench.draft_step as m; "
            "bad = [x for x in ('vllm', 'pydantic', 'yaml', 'transformers') if x in sys.modules]; "
            "assert not bad, bad; print(m.__file__)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
                       check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().startswith(str(ROOT))
    h = subprocess.run([sys.executable, "-m", "nanospec_vllm.tools.bench.draft_step", "--help"], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=600, check=False)
    assert h.returncode == 0 and "--device" in h.stdout
