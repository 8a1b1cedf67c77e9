"""``nanospec bench kernels --union``: the union path and the per-step ``auto`` choice next to the per-request
kernel and the dense head, at batch 1-256, on random full sets and on real sets (``--sets FILE``).

Per head shape, set source and batch it reports the sum of the rows' set sizes, the union's size and the head's
rows, and times (median us per call, one draft position):

* ``dense``        -- ``F.linear`` in bf16 + argmax (vLLM's drafter head);
* ``dense-masked`` -- the dense strategy of ``ops.sparse_head`` (what ``auto`` runs when it picks ``dense``);
* ``native`` / ``triton`` -- the per-request kernel;
* ``union``        -- ``ops.union``: the union's rows gathered into a buffer of ``union_rows`` (the bucket
  :func:`nanospec_vllm.ops.cost.union_bucket` picks for this union size) + one GEMM: what a step with one draft
  position pays;
* ``union-score``  -- the GEMM alone, the gather done: what every further position of the same step pays;
* ``auto``         -- :func:`nanospec_vllm.ops.cost.choose` on this batch's sizes (standing in for the lagged
  sizes of the previous step), then the chosen path (``path`` in the row), gather included.

Random full sets: ``--union-width`` (3,072) distinct random ids per row. ``--sets FILE``: a JSON list of id lists,
or JSONL with an ``ids`` list per line (``python -m nanospec_vllm.tools.bench.sets`` writes one from real
prompts); a batch draws distinct requests from the file (seeded) while it has enough, then repeats them
(``distinct`` in the row says how many differ). Ids past a head's rows are skipped, as the kernels do.
``--fit FILE.json`` prints the :class:`nanospec_vllm.ops.cost.CostModel` fitted on a run's rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict

import torch

from ... import ops
from ...ops import cost, native, triton_kernels
from ...ops.union import prepare_union, union_raw, union_size
from .. import mem_available
from .kernels_common import (
    HEADS,
    Row,
    Settings,
    Timer,
    _header,
    _randn_bf16_chunked,
    _random_ids,
)

__all__ = ["UNION_BATCHES", "UNION_HEADS", "fit_rows", "fit_rows_plain", "load_sets", "run_union", "union_markdown"]

UNION_HEADS = ["qwen2.5-0.5b", "qwen2.5-1.5b", "llama-3.1-8b", "gemma-3-1b"]
UNION_BATCHES = [1, 4, 16, 32, 64, 128, 256]
UNION_WIDTH = 3072
#: the rows whose tokens must equal the per-request kernel's (same fp32 scores, same tie rule)
UNION_EXACT = ("union", "union-score")


def load_sets(path: str) -> list[list[int]]:
    """Id lists from a JSON list of lists, or JSONL lines holding a list or ``{"ids": [...]}``."""
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
        rows = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    out = [list(r["ids"] if isinstance(r, dict) else r) for r in rows]
    if not out:
        raise ValueError(f"{path}: no id sets")
    return out


def draw(sets: list[list[int]], batch: int, gen: torch.Generator, device: torch.device):
    """``(ids [B, W] int32 -1 padded, counts [B] int32, distinct)``: distinct requests first, then repeats."""
    order = torch.randperm(len(sets), generator=gen).tolist()
    pick = [order[i % len(order)] for i in range(batch)]
    width = max(len(sets[i]) for i in pick) or 1
    ids = torch.full((batch, width), -1, dtype=torch.int32)
    for b, i in enumerate(pick):
        ids[b, : len(sets[i])] = torch.tensor(sets[i], dtype=torch.int32)
    counts = torch.tensor([len(sets[i]) for i in pick], dtype=torch.int32)
    return ids.to(device), counts.to(device), min(batch, len(sets))


def _per_request_name(dev: torch.device) -> str:
    if dev.type == "cuda" and triton_kernels.is_available(dev):
        return "triton"
    return "native" if dev.type == "cpu" and native.is_available() else "torch"


def _fns(dev: torch.device, plan_box: dict, bucket: int, ws: dict, choice: str) -> dict[str, Callable]:
    pr = _per_request_name(dev)
    per_request = {"native": native.sparse_head_native,
                   "triton": triton_kernels.sparse_head_triton}.get(pr, ops.raw_reference)

    def union(h, w, i, c):
        plan = prepare_union(w, i, c, capacity=bucket, workspace=ws)
        return union_raw(h, plan, w, i, c, overflow_impl=pr)

    def dense_masked(h, w, i, c):
        return ops.sparse_head(h, w, i, c, dense_fallback_ratio=0.0)

    paths = {"per_request": per_request, "union": union, "dense": dense_masked}
    return {
        "dense": lambda h, w, i, c: torch.nn.functional.linear(h, w).argmax(dim=-1),
        "dense-masked": dense_masked,
        pr: per_request,
        "union": union,
        "union-score": lambda h, w, i, c: union_raw(h, plan_box["plan"], w, i, c, overflow_impl=pr),
        "auto": paths[choice],
    }


def _tokens(out) -> torch.Tensor:
    if isinstance(out, ops.SparseHeadOutput):
        return out.token_ids
    return out[1] if isinstance(out, tuple) else out


def _mem_ok(rows: int, hidden: int, dev: torch.device) -> bool:
    """The union buffers (bf16 gather + fp32 copy, 6 bytes a value) fit in a third of the free memory."""
    need = rows * hidden * 6
    if dev.type == "cuda":
        return need < 0.33 * torch.cuda.mem_get_info(dev)[0]
    have = mem_available() or 2**40
    return need < 0.33 * have


def run_union(s: Settings, argv: list[str], json_path: str | None, sets_path: str | None,
              width: int = UNION_WIDTH) -> list[Row]:
    dev = torch.device(s.device)
    timer = Timer(s)
    header = _header(argv, s)
    model = cost.model_for(dev.type)
    header["cost_model"] = None if model is None else asdict(model)
    sources: list[tuple[str, list[list[int]] | None]] = [] if s.sets_only and sets_path else [("random", None)]
    if sets_path:
        sources.append((f"file:{os.path.basename(sets_path)}", load_sets(sets_path)))
    rows: list[Row] = []
    wrong: list[str] = []
    print(f"nanospec bench kernels --union: device={dev} per-request={_per_request_name(dev)} "
          f"cost model={'fitted' if model else 'none (auto = per-request)'}", flush=True)

    def save() -> None:
        if hasattr(os, "getloadavg"):  # other processes on the machine skew CPU timings: keep the evidence
            header["machine"]["loadavg_at_save"] = list(os.getloadavg())
        if json_path:
            os.makedirs(os.path.dirname(os.path.abspath(json_path)) or ".", exist_ok=True)
            header["wrong_tokens"] = wrong
            with open(json_path, "w") as f:
                json.dump({"header": header, "rows": [asdict(r) for r in rows], "summary": {}}, f, indent=1)

    for head in s.heads:
        H, V = HEADS[head]
        gen = torch.Generator(device=dev if dev.type == "cuda" else "cpu").manual_seed(0)
        weight = (torch.randn(V, H, generator=gen, device=dev) * 0.02).to(torch.bfloat16) \
            if dev.type == "cuda" else _randn_bf16_chunked(V, H, gen)
        ws: dict = {}
        for source, sets in sources:
            for batch in s.batches:
                rows += _batch(timer, dev, head, weight, ws, source, sets, batch, width, model, gen, wrong)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                save()
        del weight, ws
    save()
    print(union_markdown({"rows": [asdict(r) for r in rows]}))
    if wrong:
        raise RuntimeError("union rows returned tokens that differ from the per-request kernel:\n  "
                           + "\n  ".join(wrong))
    return rows


def _batch(timer: Timer, dev: torch.device, head: str, weight: torch.Tensor, ws: dict, source: str,
           sets: list[list[int]] | None, batch: int, width: int, model: cost.CostModel | None,
           gen: torch.Generator, wrong: list[str]) -> list[Row]:
    """Every row of one (head, set source, batch)."""
    H, V = HEADS[head]
    g = torch.Generator().manual_seed(batch)
    if sets is None:
        ids = _random_ids(batch, width, V, dev, gen)
        counts = torch.full((batch,), width, dtype=torch.int32, device=dev)
        distinct = batch
    else:
        ids, counts, distinct = draw(sets, batch, g, dev)
    hidden = torch.randn(batch, H, generator=g).to(device=dev, dtype=torch.bfloat16)
    S, U = int(counts.sum()), int(union_size(ids, counts, V))  # host reads: the bench only
    bucket = cost.union_bucket(U, batch, ids.shape[1], V)
    choice = cost.choose(model, cost.StepSizes(batch, H, V, S, U), bucket) if model is not None else "per_request"
    if choice == "union" and not _mem_ok(bucket, H, dev):
        choice = "per_request"
    box: dict = {}
    fns = _fns(dev, box, bucket, ws, choice)
    ref = _tokens(fns[_per_request_name(dev)](hidden, weight, ids, counts)).long()

    def call(fn: Callable) -> Callable:
        return lambda: fn(hidden, weight, ids, counts)

    out: list[Row] = []
    dense_us = None
    for name, fn in fns.items():
        row = Row(name, dev.type, head, H, V, batch, ids.shape[1], float("nan"), 0, "eager", sets=source,
                  sum_sets=S, union_size=U, union_rows=bucket, distinct=distinct,
                  path=choice if name == "auto" else None)
        if name.startswith("union") and not _mem_ok(bucket, H, dev):
            row.error = f"skipped: union buffers of {bucket * H * 6 / 2**30:.1f} GiB"
            out.append(row)
            continue
        try:
            if name == "union-score":
                box["plan"] = prepare_union(weight, ids, counts, capacity=bucket, workspace=ws)
            row.tokens_match = float((_tokens(fn(hidden, weight, ids, counts)).long() == ref).float().mean())
            if row.tokens_match < 1.0 and (name in UNION_EXACT or (name == "auto" and choice != "dense")):
                wrong.append(f"{head} {source} B={batch} {name}: {row.tokens_match:.3f} of rows match")
            us, row.reps = timer.time(call(fn))
            row.median_us = round(us, 2)
        except Exception as e:  # noqa: BLE001 - one broken path must not lose the run
            row.error = f"{type(e).__name__}: {e}"[:300]
            print(f"  {head} {source} B={batch} {name}: {row.error}", flush=True)
        if name == "dense" and not row.error:
            dense_us = row.median_us
        if dense_us and not row.error:
            row.speedup_vs_dense = round(dense_us / row.median_us, 3)
        out.append(row)
    box.clear()
    print(f"  done {head} {source} batch={batch}: sum {S:,} union {U:,} V {V:,} auto={choice}", flush=True)
    return out


def fit_rows_plain(data: dict, mode: str = "graph") -> list[dict]:
    """The rows of a plain ``bench kernels`` run (no ``--union``: random full sets of ``active`` ids per row) as
    :func:`nanospec_vllm.ops.cost.fit` reads them with ``union=False``: the per-request kernel (``triton`` on
    CUDA, ``native`` on CPU) and the dense head (vLLM's), timed in ``mode`` (``graph`` on CUDA: device time)."""
    impls = {r["impl"] for r in data["rows"]}
    per = "triton" if "triton" in impls and data["rows"][0].get("device") == "cuda" else "native"
    out = []
    for r in data["rows"]:
        if r.get("error") or r.get("mode", mode) != mode or r["impl"] not in (per, "dense"):
            continue
        out.append({"path": "per_request" if r["impl"] == per else "dense", "median_us": r["median_us"],
                    "hidden": r["hidden"], "vocab": r["vocab"], "batch": r["batch"],
                    "sum_sets": r["batch"] * r["active"], "union_rows": 0})
    return out


def fit_rows(data: dict) -> list[dict]:
    """The rows of a ``--union`` run as :func:`nanospec_vllm.ops.cost.fit` reads them (per-request, dense-masked,
    union, union-score)."""
    # ``dense``: vLLM's own head (a step the cost model sends there is handed back, unmasked)
    path_of = {"native": "per_request", "triton": "per_request", "torch": "per_request", "dense": "dense",
               "union": "union", "union-score": "union_score"}
    out = []
    for r in data["rows"]:
        if r.get("sets") is None or r.get("error") or r["impl"] not in path_of:
            continue
        out.append({"path": path_of[r["impl"]], "median_us": r["median_us"], "hidden": r["hidden"],
                    "vocab": r["vocab"], "batch": r["batch"], "sum_sets": r["sum_sets"],
                    "union_rows": r["union_rows"], "sets": r["sets"]})
    return out


def _us(r: dict | None) -> str:
    if r is None:
        return ""
    if r.get("error"):
        return "skipped" if r["error"].startswith("skipped") else "error"
    us = r["median_us"]
    txt = f"{us / 1000:,.1f} ms" if us >= 1000 else f"{us:.0f} us"
    sp = r.get("speedup_vs_dense")
    return txt if r["impl"] == "dense" or sp is None else f"{txt} ({sp:.2f}x)"


def union_markdown(data: dict) -> str:
    """One table per head and set source: sizes, then median per call and speedup vs ``dense``."""
    rows = [r for r in data["rows"] if r.get("sets") is not None]
    out: list[str] = []
    for head in [h for h in HEADS if any(r["head"] == h for r in rows)]:
        for source in dict.fromkeys(r["sets"] for r in rows if r["head"] == head):
            sel = [r for r in rows if r["head"] == head and r["sets"] == source]
            impls = list(dict.fromkeys(r["impl"] for r in sel))
            H, V = HEADS[head]
            out.append(f"\n**{head}** head (H={H}, V={V:,}), {sel[0]['device']}, sets: {source}: median per call "
                       "(speedup vs dense)\n")
            out.append("| batch | distinct | sum of sets | union | union / sum | union / V | buffer | "
                       + " | ".join(impls) + " | auto path |")
            out.append("|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(impls) + "---|")
            for b in sorted({r["batch"] for r in sel}):
                at = {r["impl"]: r for r in sel if r["batch"] == b}
                r0 = next(iter(at.values()))
                S, U = r0["sum_sets"], r0["union_size"]
                out.append(f"| {b} | {r0.get('distinct')} | {S:,} | {U:,} | {U / max(S, 1):.2f} | {U / V:.3f} | "
                           f"{r0['union_rows']:,} | " + " | ".join(_us(at.get(i)) for i in impls)
                           + f" | {(at.get('auto') or {}).get('path') or ''} |")
    return "\n".join(out) + "\n"
