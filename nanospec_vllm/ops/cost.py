"""Which sparse-head path is cheapest for a step: a small cost model, pure functions, no tensors.

Three ways to score a batch of ``B`` rows whose sets hold ``S`` ids in all and ``U`` distinct head rows (the
union), for a head of ``Vw`` rows x ``H``:

* ``per_request`` -- the per-request kernel (native / Triton): reads ``S`` rows, one dot product each;
* ``union``       -- :mod:`.union`: gathers the union's rows once per step into a buffer of ``N`` rows (a
  bucket >= ``U``, :func:`union_bucket`), then one ``[B, H] x [H, N]`` fp32 GEMM per draft position;
* ``dense``       -- vLLM's own full head: the vLLM integration hands such a step back (unmasked, from the full
  vocabulary: still lossless, as the target verifies every draft), so it costs what speculation without NanoSpec
  costs. (The static ``dense_fallback_ratio`` rule inside :func:`.sparse_head` is another thing: the full head
  masked to the sets, ``dense_masked_scores``.)

Model, in microseconds per draft position (``K`` positions share one union gather)::

    per_request = a0 + a1 * S * H
    dense       = d0 + d1 * Vw * H + d2 * B * Vw * H
    union       = (p0 + p1 * Vw + p2 * N * H) / K + s0 + s1 * N * H + s2 * B * N * H

The constants are fitted (:func:`fit`, least squares on relative error) from ``nanospec bench kernels`` rows of
one device; the fit for this project's CPU is :data:`CPU_MODEL`, with the command that produced it. :func:`choose`
is deterministic: the lowest predicted cost, ties in the order ``per_request``, ``union``, ``dense``. Its inputs
are sizes the host has without waiting for the device: ``B``, ``H``, ``Vw``, ``K`` (static or host data) and
``S``, ``U`` as copied back from earlier steps (lagged; :class:`..vllm.head.SparseDraftHead` keeps them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["CPU_MODEL", "H200_MODEL", "PATHS", "CostModel", "StepSizes", "choose", "fit", "model_for", "predict",
           "union_bucket"]

PATHS = ("per_request", "union", "dense")
#: union buffer sizes: 1,024 x 2^k / 2 steps (1,024, 1,536, 2,048, 3,072, 4,096, ...), so a bucket wastes <= 50%
_BUCKET_BASE = 1024


@dataclass(frozen=True)
class StepSizes:
    batch: int  # B: rows drafted by the sparse head this step
    hidden: int  # H
    vocab_rows: int  # Vw: head rows
    sum_sets: int  # S: ids in all the rows' sets (lagged)
    union: int  # U: distinct head rows among them (lagged)
    positions: int = 1  # K: draft positions that reuse one union gather


@dataclass(frozen=True)
class CostModel:
    per_request: tuple[float, float]  # a0, a1
    dense: tuple[float, float, float]  # d0, d1, d2
    union_prepare: tuple[float, float, float] | None  # p0, p1, p2 (None: the union path was not measured)
    union_score: tuple[float, float, float] | None  # s0, s1, s2 (None: idem; then it is never chosen)
    source: str = ""  # how the constants were obtained


def union_bucket(union: int, batch: int, width: int, vocab_rows: int) -> int:
    """The union buffer for a step whose lagged union size is ``union``: the smallest bucket >= 1.25 x union +
    256 (room for the sets' growth since it was measured), never above the largest possible union
    ``min(Vw, B x width)``. A union that outgrows it is finished exactly by the overflow pass of
    :func:`.union.union_raw`."""
    bound = max(1, min(vocab_rows, batch * width))
    need = int(1.25 * max(0, union)) + 256
    b = _BUCKET_BASE
    while b < need:
        b = b * 3 // 2 if (b & (b - 1)) == 0 else b * 4 // 3  # 1024, 1536, 2048, 3072, 4096, ...
    return min(b, bound)


def predict(m: CostModel, z: StepSizes, union_rows: int | None = None) -> dict[str, float]:
    """Predicted microseconds per draft position of each path. ``union_rows``: the union buffer (default
    ``max(U, 1)``)."""
    n = max(1, z.union if union_rows is None else union_rows)
    a0, a1 = m.per_request
    d0, d1, d2 = m.dense
    H, V, B = z.hidden, z.vocab_rows, z.batch
    union = float("inf")  # not measured on this device: never chosen
    if m.union_prepare is not None and m.union_score is not None:
        p0, p1, p2 = m.union_prepare
        s0, s1, s2 = m.union_score
        union = (p0 + p1 * V + p2 * n * H) / max(1, z.positions) + s0 + s1 * n * H + s2 * B * n * H
    return {
        "per_request": a0 + a1 * z.sum_sets * H,
        "union": union,
        "dense": d0 + d1 * V * H + d2 * B * V * H,
    }


def choose(m: CostModel, z: StepSizes, union_rows: int | None = None,
           allowed: Iterable[str] = PATHS) -> str:
    """The path with the lowest predicted cost among ``allowed`` (ties: the order of :data:`PATHS`)."""
    cost = predict(m, z, union_rows)
    allowed = set(allowed)
    return min((p for p in PATHS if p in allowed), key=lambda p: (cost[p], PATHS.index(p)))


# ------------------------------------------------------------------------------------------------- fitting
def _features(path: str, r: Mapping) -> list[float]:
    H, V, B = r["hidden"], r["vocab"], r["batch"]
    if path == "per_request":
        return [1.0, r["sum_sets"] * H]
    if path == "dense":
        return [1.0, V * H, B * V * H]
    n = r["union_rows"]
    if path == "union_score":
        return [1.0, n * H, B * n * H]
    return [1.0, V, n * H]  # union_prepare


def _lstsq_nonneg(xs: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares on relative error with non-negative coefficients (a feature whose coefficient comes out
    negative is dropped and the rest refitted)."""
    import numpy as np

    X = np.array(xs, dtype=np.float64)
    y = np.array(ys, dtype=np.float64)
    w = 1.0 / np.maximum(y, 1e-9)  # relative error: small and large timings count alike
    keep = list(range(X.shape[1]))
    coef = np.zeros(X.shape[1])
    while keep:
        c, *_ = np.linalg.lstsq(X[:, keep] * w[:, None], y * w, rcond=None)
        if (c >= 0).all():
            coef[:] = 0
            coef[keep] = c
            break
        keep.pop(int(np.argmin(c)))
    return [float(v) for v in coef]


def fit(rows: Iterable[Mapping], source: str = "", union: bool = True) -> CostModel:
    """Fit the constants from benchmark rows: dicts with ``path`` (``per_request``, ``dense``, ``union`` = gather
    + one position, ``union_score`` = one position with the gather done), ``median_us``, ``hidden``, ``vocab``,
    ``batch``, ``sum_sets`` and ``union_rows`` (the union buffer). ``union_prepare`` is fitted on ``union`` minus
    the ``union_score`` of the same shape. ``union=False``: a run without union rows (an older ``bench kernels``
    run): the model has no union constants and never chooses that path."""
    rows = list(rows)
    by: dict[str, list[Mapping]] = {p: [r for r in rows if r["path"] == p] for p in
                                    ("per_request", "dense", "union", "union_score")}
    out = {}
    for path in ("per_request", "dense", *(("union_score",) if union else ())):
        sel = by[path]
        if not sel:
            raise ValueError(f"no {path} rows to fit")
        out[path] = _lstsq_nonneg([_features(path, r) for r in sel], [r["median_us"] for r in sel])
    if not union:
        return CostModel(tuple(out["per_request"]), tuple(out["dense"]), None, None, source)
    score = {_shape(r): r["median_us"] for r in by["union_score"]}
    prep = [(r, r["median_us"] - score[_shape(r)]) for r in by["union"] if _shape(r) in score]
    prep = [(r, y) for r, y in prep if y > 0]
    if not prep:
        raise ValueError("no union rows with a matching union_score row to fit the gather")
    out["union_prepare"] = _lstsq_nonneg([_features("union_prepare", r) for r, _ in prep], [y for _, y in prep])
    return CostModel(tuple(out["per_request"]), tuple(out["dense"]), tuple(out["union_prepare"]),
                     tuple(out["union_score"]), source)


def _shape(r: Mapping) -> tuple:
    return (r["hidden"], r["vocab"], r["batch"], r["union_rows"], r.get("sets", ""))


#: Fitted on this project's CPU (2-core AMD EPYC with AVX-512, shared with other jobs: noisy), native per-request
#: kernel, bf16 heads, random full sets of 3,072 ids, batch 1-256, four head shapes (docs/benchmarks/union-cpu.md).
CPU_MODEL = CostModel(
    per_request=(9021.0, 0.0012695),
    dense=(215066.0, 3.1019e-05, 3.7385e-05),
    union_prepare=(0.0, 0.58956, 0.0012474),
    union_score=(0.0, 0.00042684, 0.00017012),
    source="nanospec bench kernels --device cpu --union --heads qwen2.5-0.5b llama-3.1-8b --budget-s 0.01 and "
           "--heads gemma-3-1b qwen2.5-1.5b (2026-12-03, random full sets), fitted by "
           "nanospec bench kernels --fit docs/benchmarks/union-cpu-random.json",
)


#: Fitted on one NVIDIA H200 (graph replay: device time), Triton per-request kernel vs the dense head (vLLM's, which
#: a ``dense`` step is handed to), bf16 Qwen2.5-0.5B and Llama-3.1-8B heads, random full sets of 256-3,072 ids,
#: batch 1-256 (docs/benchmarks/kernels-h200.md). That run had no union rows: on CUDA ``auto`` chooses between
#: the per-request kernel and the dense head only. Other GPUs have the same trade-off at other constants.
H200_MODEL = CostModel(
    per_request=(11.841, 6.0404e-07),
    dense=(28.910, 4.5185e-07, 1.3599e-09),
    union_prepare=None,
    union_score=None,
    source="nanospec bench kernels --device cuda --json /root/out/kernels-h200.json (2026-11-28T17:34:48+00:00), "
           "fitted by nanospec bench kernels --fit docs/benchmarks/kernels-h200.json",
)


def model_for(device_type: str) -> CostModel | None:
    """The fitted model of a device type: :data:`CPU_MODEL` for ``cpu``, :data:`H200_MODEL` for ``cuda`` (the one
    GPU measured), None elsewhere (the caller keeps its per-request kernel and the static ``dense_fallback_ratio``
    rule)."""
    return {"cpu": CPU_MODEL, "cuda": H200_MODEL}.get(device_type)
