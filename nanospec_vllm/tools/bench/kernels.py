"""Micro-benchmark: the sparse draft head against the dense lm_head it replaces.

``nanospec bench kernels [--device cpu|cuda] [--quick] [--json PATH]`` or ``python -m nanospec_vllm.tools.bench.kernels``.

For each head shape (Qwen2.5-0.5B: H=896, V=151,936; Llama-3.1-8B: H=4096, V=128,256; random bf16 weights),
batch size and active-set size (random distinct ids per row, every row full) it times:

* ``dense``        -- ``F.linear`` in bf16 over the whole head, then argmax (what vLLM's drafter head does);
* ``dense-masked`` -- the ``dense`` strategy of :func:`nanospec_vllm.ops.sparse_head` (full head, masked);
* ``torch``        -- the PyTorch reference sparse head;
* ``native``       -- the C++ CPU kernel (CPU, when built);
* ``triton``       -- the Triton kernel (CUDA), plus a small sweep of block shapes (``triton:bcX-bhY-wZ``).

``--union [--sets FILE]`` runs the union / ``auto`` sweep instead (:mod:`.kernels_union`: four head shapes, batch
1-256, random full sets and real ones, union sizes next to the sum of the sets); ``--fit FILE.json`` prints the
cost model fitted on such a run. Shared parts: :mod:`.kernels_common`; tables: :mod:`.kernels_report`.

Timing: warm-up calls, then repeats until a time budget (at least ``min_reps``), median reported. Before every
repeat the last-level cache is flushed (a buffer twice the L3 / 256 MB on GPUs is overwritten), so the active
rows are read from memory as in the first draft step after a verification pass; ``--warm`` skips the flush. On
CUDA each repeat is timed with CUDA events around the call; ``graph`` rows replay the call captured in a CUDA
graph (how vLLM runs the drafter), ``eager`` rows launch it from Python.

Needs only torch (and triton for the Triton rows): it imports ``nanospec_vllm.ops`` and nothing that needs vLLM,
pydantic or yaml, so ``PYTHONPATH=. python -m nanospec_vllm.tools.bench.kernels --device cuda`` runs from a checkout.
Results are printed as tables and, with ``--json``, written (after every shape, so a cut-short run keeps what
it measured) as ``{"header": {...}, "rows": [...], "summary": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from ... import ops
from ...ops import native, triton_kernels
from ...ops.reference import raw_reference
from . import micro_bench_main
from .kernels_common import (
    ACTIVES,
    BATCHES,
    CUDA_EXTRA_BATCHES,
    DEFAULT_HEADS,
    HEADS,
    QUICK,
    TRITON_SWEEP,
    TRITON_SWEEP_BATCHES,
    Row,
    Settings,
    Timer,
    _header,
    _randn_bf16_chunked,
    _random_ids,
    _too_big,
)
from .kernels_report import _main_mode, _print_table, _summary, markdown

__all__ = ["EXACT", "HEADS", "QUICK", "Row", "Settings", "main", "markdown", "parse", "run"]


# ---------------------------------------------------------------- what is timed
def _impls(device: torch.device) -> dict[str, Callable]:
    """name -> fn(hidden, weight, ids, counts) for every implementation usable on ``device``."""
    out: dict[str, Callable] = {
        "dense": lambda h, w, i, c: torch.nn.functional.linear(h, w).argmax(dim=-1),
        "dense-masked": lambda h, w, i, c: ops.sparse_head(h, w, i, c, dense_fallback_ratio=0.0),
        "torch": lambda h, w, i, c: raw_reference(h, w, i, c),
    }
    if device.type == "cpu" and native.is_available():
        out["native"] = native.sparse_head_native
    if triton_kernels.is_available(device) and device.type == "cuda":
        out["triton"] = triton_kernels.sparse_head_triton
    return out


def _triton_variants(batch: int, active: int, largest_active: int) -> dict[str, Callable]:
    if batch not in TRITON_SWEEP_BATCHES or active != largest_active:
        return {}
    out = {}
    for bc, bh, nw in TRITON_SWEEP:
        def fn(h, w, i, c, bc=bc, bh=bh, nw=nw):
            return triton_kernels.sparse_head_triton(h, w, i, c, block_c=bc, block_h=bh, num_warps=nw)
        out[f"triton:bc{bc}-bh{bh}-w{nw}"] = fn
    return out


def _tokens(out) -> torch.Tensor:
    """The draft tokens of any timed callable's result (raw triple, SparseHeadOutput or a token tensor)."""
    if isinstance(out, ops.SparseHeadOutput):
        return out.token_ids
    if isinstance(out, tuple):
        return out[1]
    return out


#: implementations whose tokens must equal the reference exactly (same fp32 scores, same tie rule); the
#: ``dense-masked`` strategy scores in the weight's dtype (as vLLM's head does), so bf16 near-ties may differ.
EXACT = ("torch", "native", "triton")


def run(s: Settings, argv: list[str], json_path: str | None) -> list[Row]:
    if s.union:
        from .kernels_union import run_union

        return run_union(s, argv, json_path, s.sets, s.union_width)
    dev = torch.device(s.device)
    timer = Timer(s)
    header = _header(argv, s)
    rows: list[Row] = []
    impls = _impls(dev)
    modes = ["eager", "graph"] if dev.type == "cuda" else ["eager"]
    print(f"nanospec bench kernels: device={dev} impls={list(impls)} flush={s.flush} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}", flush=True)
    gen = torch.Generator(device=dev if dev.type == "cuda" else "cpu").manual_seed(0)
    wrong: list[str] = []

    def save() -> None:
        if hasattr(os, "getloadavg"):  # other processes on the machine skew CPU timings: keep the evidence
            header["machine"]["loadavg_at_save"] = list(os.getloadavg())
        if json_path:
            os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
            with open(json_path, "w") as f:
                json.dump({"header": header, "rows": [asdict(r) for r in rows], "summary": _summary(rows)}, f,
                          indent=1)

    for head in s.heads:
        H, V = HEADS[head]
        weight = (torch.randn(V, H, generator=gen, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16) \
            if dev.type == "cuda" else _randn_bf16_chunked(V, H, gen)
        for batch in s.batches:
            hidden = torch.randn(batch, H, generator=gen, device=gen.device).to(device=dev, dtype=torch.bfloat16)
            all_ids = _random_ids(batch, max(s.actives), V, dev, gen)
            dense_us: dict[str, float] = {}
            for active in s.actives:
                ids = all_ids[:, :active].contiguous()
                counts = torch.full((batch,), active, dtype=torch.int32, device=dev)
                todo = dict(impls)
                ref_tok = None if _too_big("torch", batch, active, H, dev) else raw_reference(
                    hidden, weight, ids, counts)[1]
                if dev.type == "cuda":
                    todo.update(_triton_variants(batch, active, max(s.actives)) if "triton" in impls else {})
                for name, fn in todo.items():
                    if name == "dense" and active != s.actives[0]:  # independent of the active set: reuse
                        for mode in modes:
                            prev = next(r for r in rows if r.impl == "dense" and r.head == head and
                                        r.batch == batch and r.mode == mode)
                            rows.append(Row(**{**asdict(prev), "active": active}))
                        continue
                    match = None
                    if name != "dense" and ref_tok is not None and not _too_big(name, batch, active, H, dev):
                        try:
                            got = _tokens(fn(hidden, weight, ids, counts)).long()
                            match = float((got == ref_tok.long()).float().mean())
                        except Exception:  # noqa: BLE001 - reported by the timing below
                            match = None
                        if match is not None and match < 1.0 and name.split(":")[0] in EXACT:
                            wrong.append(f"{name} B={batch} C={active}: {match:.3f} of rows match the reference")
                    for mode in modes:
                        t0 = time.perf_counter()
                        def call(fn=fn, h=hidden, w=weight, i=ids, c=counts):
                            return fn(h, w, i, c)
                        too_big = _too_big(name, batch, active, H, dev)
                        if too_big:
                            rows.append(Row(name, dev.type, head, H, V, batch, active, float("nan"), 0, mode,
                                            error=too_big))
                            continue
                        try:
                            us, reps = (timer.time_graph(call) if mode == "graph" else timer.time(call))
                            row = Row(name, dev.type, head, H, V, batch, active, round(us, 2), reps, mode)
                        except Exception as e:  # noqa: BLE001 - one broken impl must not lose the run
                            row = Row(name, dev.type, head, H, V, batch, active, float("nan"), 0, mode,
                                      error=f"{type(e).__name__}: {e}"[:300])
                            print(f"  {name} {mode} B={batch} C={active}: {row.error}", flush=True)
                        row.tokens_match = match
                        if name == "dense" and not row.error:
                            dense_us[mode] = row.median_us
                        if mode in dense_us and not row.error:
                            row.speedup_vs_dense = round(dense_us[mode] / row.median_us, 3)
                        rows.append(row)
                        if os.environ.get("NANOSPEC_BENCH_VERBOSE"):
                            print(f"  {head} B={batch} C={active} {name} {mode}: {row.median_us} us "
                                  f"({reps} reps, {time.perf_counter() - t0:.1f}s)", flush=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            save()
            print(f"  done {head} batch={batch}", flush=True)
        del weight
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for head in s.heads:
        for mode in modes:
            _print_table(rows, head, mode)
    summ = _summary(rows)
    print(f"\nwhere the best sparse impl stops beating dense ({_main_mode(rows)}):")
    for c in summ["crossover"]:
        if c["smallest_batch_dense_wins"] is None:
            verdict = f"sparse wins at every measured batch (up to {c['largest_batch_sparse_wins']})"
        else:
            verdict = (f"sparse wins up to batch {c['largest_batch_sparse_wins']}, dense from batch "
                       f"{c['smallest_batch_dense_wins']} (B*C/V = {c['batch_x_active_over_vocab_at_loss']})")
        print(f"  {c['head']:>14} active={c['active']:>5}: {verdict}")
    header["wrong_tokens"] = wrong
    save()
    if wrong:
        raise RuntimeError("sparse implementations returned tokens that differ from the reference:\n  "
                           + "\n  ".join(wrong))
    return rows


def parse(argv: list[str]) -> tuple[Settings, str | None, str | None]:
    p = argparse.ArgumentParser(prog="nanospec bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="a small subset (Qwen head, batch 1/16, active 256/3072)")
    p.add_argument("--json", metavar="PATH", help="write header + rows + summary here")
    p.add_argument("--warm", action="store_true", help="do not flush the cache between repeats")
    p.add_argument("--heads", nargs="+", choices=sorted(HEADS), help="override the head shapes")
    p.add_argument("--batches", nargs="+", type=int, help="override the batch sizes")
    p.add_argument("--actives", nargs="+", type=int, help="override the active-set sizes")
    p.add_argument("--markdown", metavar="JSON", help="print the tables of an earlier --json run as markdown")
    p.add_argument("--budget-s", type=float, help="time budget per measurement (default: 0.5 CPU, 0.05 CUDA)")
    p.add_argument("--union", action="store_true", help="the union / auto sweep (batch 1-256, four head shapes)")
    p.add_argument("--sets", metavar="FILE", help="--union: real per-request id sets (JSON or JSONL)")
    p.add_argument("--union-width", type=int, default=3072, help="--union: ids per row of the random full sets")
    p.add_argument("--sets-only", action="store_true", help="--union --sets: skip the random full sets")
    p.add_argument("--fit", metavar="JSON", help="print the cost model fitted on an earlier --union run")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    if a.union:
        from .kernels_union import UNION_BATCHES, UNION_HEADS

        heads, batches, actives = UNION_HEADS, UNION_BATCHES, [a.union_width]
    elif a.quick:
        heads, batches, actives = QUICK["heads"], QUICK["batches"], QUICK["actives"]
    else:
        heads, batches, actives = DEFAULT_HEADS, BATCHES + (CUDA_EXTRA_BATCHES if cuda else []), ACTIVES
    s = Settings(
        device=a.device,
        warmup=3 if cuda else 1,
        min_reps=10 if cuda else 3,
        max_reps=200 if cuda else (10 if a.quick or a.union else 40),
        budget_s=a.budget_s if a.budget_s is not None else (0.05 if cuda else (0.1 if a.quick else 0.5)),
        flush=not a.warm,
        heads=a.heads or heads,
        batches=a.batches or batches,
        actives=sorted(a.actives or actives),
        union=a.union,
        sets=a.sets,
        union_width=a.union_width,
        sets_only=a.sets_only,
    )
    return s, a.json, a.markdown


def fit_main(path: str) -> int:
    """``--fit FILE.json``: the cost model fitted on a run's rows, as Python: a ``--union`` run gives every
    path's constants; a plain run (no union rows) the per-request kernel's and the dense head's only."""
    from ...ops import cost
    from .kernels_union import fit_rows, fit_rows_plain

    with open(path) as f:
        data = json.load(f)
    src = f"{data['header']['command']} ({data['header']['date']}), fitted by nanospec bench kernels --fit {path}"
    rows = fit_rows(data)
    m = cost.fit(rows, source=src) if rows else cost.fit(fit_rows_plain(data), source=src, union=False)
    print(f"CostModel(\n    per_request={m.per_request!r},\n    dense={m.dense!r},\n"
          f"    union_prepare={m.union_prepare!r},\n    union_score={m.union_score!r},\n    source={m.source!r},\n)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--fit" in args:
        return fit_main(parse(args)[0] and args[args.index("--fit") + 1])
    return micro_bench_main("nanospec bench kernels", argv, parse, markdown, run)


if __name__ == "__main__":
    sys.exit(main())
