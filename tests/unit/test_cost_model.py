"""The per-step path choice of ``kernel: auto`` (``nanospec_vllm.ops.cost``): known answers, determinism, the
union buckets, and the fit recovering constants it was given; plus the ``--sets`` input of ``bench kernels``."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from nanospec_vllm.ops import cost
from nanospec_vllm.ops.cost import CostModel, StepSizes, choose, predict, union_bucket

# round numbers, so the predictions below can be checked by hand
M = CostModel(per_request=(10.0, 0.001), dense=(100.0, 0.0, 0.0001), union_prepare=(50.0, 0.0, 0.002),
              union_score=(5.0, 0.0, 0.00001))


def test_known_answers() -> None:
    H, V = 1000, 100_000
    # batch 1, 3,000 ids: per-request 10 + 3,000 = 3,010; dense 100 + 0.0001 * 1 * 1e8 = 10,100;
    # union over 3,000 rows: 50 + 6,000 + 5 + 0.00001 * 3e6 = 6,085
    z = StepSizes(batch=1, hidden=H, vocab_rows=V, sum_sets=3000, union=3000)
    assert predict(M, z) == pytest.approx({"per_request": 3010.0, "dense": 10100.0, "union": 6085.0})
    assert choose(M, z) == "per_request"
    # batch 64, 192,000 ids, union 20,000: per-request 192,010; dense 640,100;
    # union 50 + 40,000 + 5 + 0.00001 * 64 * 2e7 = 52,855
    z = StepSizes(batch=64, hidden=H, vocab_rows=V, sum_sets=192_000, union=20_000)
    assert choose(M, z) == "union"
    assert predict(M, z)["union"] == pytest.approx(52_855.0)
    # the same batch with no overlap (union = V): union 50 + 200,000 + 5 + 64,000 = 264,055 > per-request
    z = StepSizes(batch=64, hidden=H, vocab_rows=V, sum_sets=192_000, union=V)
    assert choose(M, z) == "per_request"
    assert choose(M, z, allowed=("union", "dense")) == "union"
    # a slower GEMM (0.0001 per B x N x H): union 840,055 > dense 640,100
    slow = dataclasses.replace(M, union_score=(5.0, 0.0, 0.0001))
    assert choose(slow, z, allowed=("union", "dense")) == "dense"
    # K draft positions share one gather: the prepare cost is divided by K
    z1 = StepSizes(batch=8, hidden=H, vocab_rows=V, sum_sets=24_000, union=5000, positions=1)
    z4 = StepSizes(batch=8, hidden=H, vocab_rows=V, sum_sets=24_000, union=5000, positions=4)
    assert predict(M, z1)["union"] - predict(M, z4)["union"] == pytest.approx((50 + 10_000) * 0.75)
    # the buffer, not the union, is what the GEMM reads
    assert predict(M, z1, union_rows=8192)["union"] > predict(M, z1)["union"]


def test_ties_break_in_path_order_and_choice_is_deterministic() -> None:
    flat = CostModel((1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0))
    z = StepSizes(4, 64, 1000, 100, 50)
    assert choose(flat, z) == "per_request"
    assert choose(flat, z, allowed=("dense", "union")) == "union"
    assert len({choose(M, StepSizes(64, 1000, 100_000, 192_000, 20_000)) for _ in range(10)}) == 1


def test_union_bucket() -> None:
    assert union_bucket(0, 64, 3072, 151_936) == 1024
    assert union_bucket(1000, 64, 3072, 151_936) == 1536  # 1.25 * 1000 + 256 = 1,506
    assert union_bucket(20_000, 64, 3072, 151_936) == 32_768  # 25,256 -> 1024, 1536, ..., 24,576, 32,768
    assert union_bucket(10**6, 64, 3072, 151_936) == 151_936  # never above the head
    assert union_bucket(5000, 1, 3072, 151_936) == 3072  # never above B x width
    seen = [1024]
    while seen[-1] < 100_000:
        seen.append(union_bucket(seen[-1], 10**6, 1, 10**7))  # the next bucket above 1.25 x
    assert all(1.25 < b / a <= 2.0 for a, b in itertools.pairwise(seen)), seen


def test_fit_recovers_the_constants_it_was_given() -> None:
    rows = []
    for H, V in ((896, 151_936), (4096, 128_256)):
        for B in (1, 4, 16, 64, 256):
            S, N = B * 3000, min(V, 2000 + 900 * B)
            z = StepSizes(B, H, V, S, N)
            p = predict(M, z)
            common = {"hidden": H, "vocab": V, "batch": B, "sum_sets": S, "union_rows": N, "sets": "x"}
            score = M.union_score[0] + M.union_score[1] * N * H + M.union_score[2] * B * N * H
            rows += [{"path": "per_request", "median_us": p["per_request"], **common},
                     {"path": "dense", "median_us": p["dense"], **common},
                     {"path": "union", "median_us": p["union"], **common},
                     {"path": "union_score", "median_us": score, **common}]
    m = cost.fit(rows, source="synthetic")
    for got, want in ((m.per_request, M.per_request), (m.dense, M.dense), (m.union_prepare, M.union_prepare),
                      (m.union_score, M.union_score)):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    with pytest.raises(ValueError):
        cost.fit([r for r in rows if r["path"] != "dense"])


def test_shipped_cpu_model_is_the_fit_of_the_committed_run() -> None:
    """``CPU_MODEL`` holds (rounded) what ``bench kernels --fit`` gives on the committed JSON."""
    from pathlib import Path

    from nanospec_vllm.tools.bench.kernels_union import fit_rows

    m = cost.model_for("cpu")
    assert m is not None and "--union" in m.source and "--fit docs/benchmarks/union-cpu-random.json" in m.source
    assert cost.model_for("xpu") is None
    data = json.loads((Path(__file__).resolve().parents[2] / "docs/benchmarks/union-cpu-random.json").read_text())
    f = cost.fit(fit_rows(data))
    for got, want in ((m.per_request, f.per_request), (m.dense, f.dense), (m.union_prepare, f.union_prepare),
                      (m.union_score, f.union_score)):
        assert got == pytest.approx(want, rel=1e-3, abs=1e-9)


def test_shipped_h200_model_is_the_fit_of_the_committed_run_and_never_slower_than_dense() -> None:
    """``H200_MODEL`` holds what ``bench kernels --fit`` gives on the committed H200 run (no union rows: the union
    path is never chosen), and replayed on that run's cells (graph replay, both heads, 256-3,072 ids, batch
    1-256) its choice is the faster of the per-request kernel and vLLM's dense head in every cell."""
    from pathlib import Path

    from nanospec_vllm.tools.bench.kernels_union import fit_rows_plain

    m = cost.model_for("cuda")
    assert m is cost.H200_MODEL and m.union_prepare is None and "kernels-h200.json" in m.source
    data = json.loads((Path(__file__).resolve().parents[2] / "docs/benchmarks/kernels-h200.json").read_text())
    rows = fit_rows_plain(data)
    f = cost.fit(rows, union=False)
    for got, want in ((m.per_request, f.per_request), (m.dense, f.dense)):
        assert got == pytest.approx(want, rel=1e-3, abs=1e-12)
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["hidden"], r["vocab"], r["batch"], r["sum_sets"]), {})[r["path"]] = r["median_us"]
    assert len(cells) == 36
    for (H, V, B, S), t in cells.items():
        z = StepSizes(B, H, V, S, S)
        pick = choose(m, z)
        assert pick != "union" and predict(m, z)["union"] == float("inf")
        assert t[pick] == min(t.values()), ((H, B, S), t, pick)
    assert choose(m, StepSizes(1, 896, 151_936, 3072, 3072)) == "per_request"
    assert choose(m, StepSizes(256, 4096, 128_256, 256 * 3072, 10**5)) == "dense"
    with pytest.raises(ValueError, match="no dense rows"):
        cost.fit([r for r in rows if r["path"] != "dense"], union=False)


def test_sets_file_and_draw(tmp_path) -> None:
    from nanospec_vllm.tools.bench.kernels_union import draw, load_sets

    f = tmp_path / "s.jsonl"
    f.write_text("\n".join(json.dumps({"task": "t", "ids": list(range(i, i + 3 + i))}) for i in range(4)) + "\n")
    sets = load_sets(str(f))
    assert sets[2] == [2, 3, 4, 5, 6]
    (tmp_path / "s.json").write_text(json.dumps([[1, 2], [3]]))
    assert load_sets(str(tmp_path / "s.json")) == [[1, 2], [3]]
    ids, counts, distinct = draw(sets, 6, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert distinct == 4 and ids.shape == (6, 6)
    rows = [ids[b, : counts[b]].tolist() for b in range(6)]
    assert sorted(map(tuple, rows[:4])) == sorted(map(tuple, sets))  # every request once before any repeats
    assert rows[4] in sets and rows[5] in sets
    assert (ids[counts[:, None] <= torch.arange(6)] == -1).all()


def test_union_markdown_of_the_committed_run() -> None:
    from pathlib import Path

    from nanospec_vllm.tools.bench import kernels

    data = json.loads((Path(__file__).resolve().parents[2] / "docs/benchmarks/union-cpu-real.json").read_text())
    md = kernels.markdown(data)
    assert md.count("| batch | distinct | sum of sets | union |") == 4  # one table per head
    assert md.count("\n| 64 | 21 | 102,816 |") == 4 and "per_request |" in md
