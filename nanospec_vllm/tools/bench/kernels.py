"""Micro-benchmark: the sparse draft head against the dense lm_head it replaces.

``nanospec bench kernels [--device cpu|cuda] [--quick] [--json PATH]`` or ``python -m nanospec_vllm.tools.bench.kernels``.

For each head shape (Qwen2.5-0.5B: H=896, V=151,936; Llama-3.1-8B: H=4096, V=128,256; random bf16 weights),
batch size and active-set size (random distinct ids per row, every row full) it times:

* ``dense``        -- ``F.linear`` in bf16 over the whole head, then argmax (what vLLM's drafter head does);
* ``dense-masked`` -- the ``dense`` strategy of :func:`nanospec_vllm.ops.sparse_head` (full head, masked);
* ``torch``        -- the PyTorch reference sparse head;
* ``native``       -- the C++ CPU kernel (CPU, when built);
* ``triton``       -- the Triton kernel (CUDA), plus a small sweep of block shapes (``triton:bcX-bhY-wZ``).

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
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ... import __version__, ops
from ...ops import native, triton_kernels
from ...ops.reference import raw_reference
from .. import assets
from . import micro_bench_main

HEADS = {"qwen2.5-0.5b": (896, 151_936), "llama-3.1-8b": (4096, 128_256)}
BATCHES = [1, 4, 16, 64]
CUDA_EXTRA_BATCHES = [128, 256]  # GPUs: find where sparse stops paying off
ACTIVES = [256, 1024, 3072]
QUICK = {"heads": ["qwen2.5-0.5b"], "batches": [1, 16], "actives": [256, 3072]}
# Block shapes tried on CUDA besides the default (BLOCK_C, BLOCK_H, num_warps), at a few shapes.
TRITON_SWEEP = [(8, 512, 4), (32, 128, 4), (16, 512, 8), (64, 128, 4), (32, 256, 8)]
TRITON_SWEEP_BATCHES = [1, 16, 64]


@dataclass
class Row:
    impl: str
    device: str
    head: str
    hidden: int
    vocab: int
    batch: int
    active: int
    median_us: float
    reps: int
    mode: str = "eager"
    speedup_vs_dense: float | None = None  # dense median / this median (> 1: faster than the dense head)
    error: str | None = None
    #: share of rows whose token equals the reference's (fp32 scores over the active set); sparse impls must be 1.0
    tokens_match: float | None = None


@dataclass
class Settings:
    device: str
    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float
    flush: bool
    heads: list[str] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    actives: list[int] = field(default_factory=list)


# ---------------------------------------------------------------- timing
class Timer:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.dev = torch.device(s.device)
        self.flush_buf = None
        if s.flush:
            if self.dev.type == "cuda":
                self.flush_buf = torch.empty(256 * 2**20, dtype=torch.int8, device=self.dev)
            else:
                self.flush_buf = torch.empty(max(2 * _l3_bytes(), 32 * 2**20) // 4, dtype=torch.float32)

    def _flush(self) -> None:
        if self.flush_buf is not None:
            self.flush_buf.zero_() if self.dev.type == "cuda" else self.flush_buf.fill_(1.0)

    def time(self, fn: Callable[[], object]) -> tuple[float, int]:
        """(median microseconds, repeats) of ``fn`` on this device."""
        if self.dev.type == "cuda":
            return self._time_cuda(fn)
        s = self.s
        for _ in range(s.warmup):
            fn()
        ts: list[float] = []
        deadline = time.perf_counter() + s.budget_s
        while len(ts) < s.max_reps and (len(ts) < s.min_reps or time.perf_counter() < deadline):
            self._flush()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e6, len(ts)

    def _time_cuda(self, fn: Callable[[], object]) -> tuple[float, int]:
        s = self.s
        for _ in range(s.warmup):
            fn()
        torch.cuda.synchronize(self.dev)
        ts: list[float] = []
        deadline = time.perf_counter() + s.budget_s
        while len(ts) < s.max_reps and (len(ts) < s.min_reps or time.perf_counter() < deadline):
            batch = min(10, s.max_reps - len(ts))
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(batch)]
            for start, end in events:
                self._flush()  # before the start event: not timed
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(self.dev)
            ts.extend(start.elapsed_time(end) * 1e3 for start, end in events)
        return statistics.median(ts), len(ts)

    def time_graph(self, fn: Callable[[], object]) -> tuple[float, int]:
        """Capture one call of ``fn`` in a CUDA graph and time its replay."""
        side = torch.cuda.Stream(self.dev)
        side.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        try:
            return self._time_cuda(graph.replay)
        finally:
            del graph
            torch.cuda.synchronize(self.dev)


def _l3_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            txt = f.read().strip().upper()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(txt[-1], 1)
        return int(txt.rstrip("KMG")) * mult
    except (OSError, ValueError):
        return 64 * 2**20


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


def _random_ids(batch: int, width: int, vocab: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """``[batch, width]`` int32, distinct random ids per row."""
    keys = torch.rand(batch, vocab, generator=gen, device=gen.device)
    return keys.topk(width, dim=1).indices.to(device=device, dtype=torch.int32)


# ---------------------------------------------------------------- run
def _header(argv: list[str], s: Settings) -> dict:
    dev = torch.device(s.device)
    machine: dict = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        machine.update(gpu=p.name, gpu_sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                       cuda=torch.version.cuda)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["nanospec bench kernels", *argv]),  # = python -m nanospec_vllm.tools.bench.kernels ...
        "process_argv": sys.argv,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
                     "nanospec_vllm": __version__},
        "native": {"available": native.is_available(), "isa": native.isa(), "build_error": native.build_error()},
        "machine": machine,
        "settings": asdict(s),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _summary(rows: list[Row]) -> dict:
    """Best sparse impl per shape, and per (head, active) the largest batch where it still beats ``dense``."""
    best: dict[tuple, Row] = {}
    for r in rows:
        if r.error or r.impl in ("dense", "dense-masked") or r.mode != _main_mode(rows):
            continue
        key = (r.head, r.batch, r.active)
        if key not in best or r.median_us < best[key].median_us:
            best[key] = r
    per_shape = [{"head": h, "batch": b, "active": a, "best_impl": r.impl, "median_us": r.median_us,
                  "speedup_vs_dense": r.speedup_vs_dense} for (h, b, a), r in sorted(best.items())]
    crossover = []
    for head in sorted({k[0] for k in best}):
        vocab = HEADS[head][1]
        for active in sorted({k[2] for k in best if k[0] == head}):
            pays = [b for (h, b, a), r in best.items() if h == head and a == active and (r.speedup_vs_dense or 0) > 1]
            loses = [b for (h, b, a), r in best.items()
                     if h == head and a == active and (r.speedup_vs_dense or 0) <= 1]
            last = max(pays) if pays else None
            first_loss = min(loses) if loses else None
            crossover.append({"head": head, "active": active, "largest_batch_sparse_wins": last,
                              "smallest_batch_dense_wins": first_loss,
                              "batch_x_active_over_vocab_at_loss": (round(first_loss * active / vocab, 3)
                                                                    if first_loss else None)})
    return {"best_sparse": per_shape, "crossover": crossover}


def _main_mode(rows: list[Row]) -> str:
    return "graph" if any(r.mode == "graph" and not r.error for r in rows) else "eager"


def _print_table(rows: list[Row], head: str, mode: str) -> None:
    sel = [r for r in rows if r.head == head and r.mode == mode]
    if not sel:
        return
    impls = [i for i in ("dense", "dense-masked", "torch", "native", "triton") if any(r.impl == i for r in sel)]
    H, V = HEADS[head]
    print(f"\n{head} head (H={H}, V={V:,}), {sel[0].device}, {mode}: median us (speedup vs dense)")
    cols = ["batch", "active"] + impls
    print(" | ".join(f"{c:>20}" if c not in ("batch", "active") else f"{c:>6}" for c in cols))
    for b in sorted({r.batch for r in sel}):
        for a in sorted({r.active for r in sel}):
            cells = [f"{b:>6}", f"{a:>6}"]
            for i in impls:
                r = next((x for x in sel if x.impl == i and x.batch == b and x.active == a), None)
                if r is None:
                    cells.append(f"{'-':>20}")
                elif r.error:
                    cells.append(f"{'skipped' if r.error.startswith('skipped') else 'error':>20}")
                else:
                    sp = f" ({r.speedup_vs_dense:.1f}x)" if r.speedup_vs_dense and i != "dense" else ""
                    cells.append(f"{r.median_us:>11.1f}{sp:>9}")
            print(" | ".join(cells))


def run(s: Settings, argv: list[str], json_path: str | None) -> list[Row]:
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


def _too_big(impl: str, batch: int, active: int, hidden: int, dev: torch.device) -> str | None:
    """The PyTorch reference materialises the gathered rows in bf16 and fp32 (6 bytes per weight element):
    skip it where that would not fit comfortably (batch 256 x 3,072 ids x 4096 needs 19 GB)."""
    if impl != "torch":
        return None
    need = batch * active * hidden * 6
    if dev.type == "cuda":
        have = torch.cuda.mem_get_info(dev)[0]
    else:  # MemAvailable (free + reclaimable page cache): free pages alone are ~0 once models are cached
        have = assets._mem_available()
        if have is None:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 2**40
    if need > 0.4 * have:
        return f"skipped: the reference needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB free"
    return None


def _randn_bf16_chunked(rows: int, cols: int, gen: torch.Generator, chunk: int = 16_384) -> torch.Tensor:
    """Random bf16 ``[rows, cols]`` without a full fp32 temporary (the Llama head would need 2 GB)."""
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        out[r0:r1] = torch.randn(r1 - r0, cols, generator=gen) * 0.02
    return out


def markdown(data: dict) -> str:
    """Markdown tables (median us and speedup vs dense, per head and mode) from a ``--json`` file's content."""
    rows = [Row(**r) for r in data["rows"]]
    out = []
    for head in [h for h in HEADS if any(r.head == h for r in rows)]:
        for mode in ("graph", "eager"):
            sel = [r for r in rows if r.head == head and r.mode == mode]
            if not sel:
                continue
            impls = []
            for r in sel:
                if r.impl not in impls:
                    impls.append(r.impl)
            H, V = HEADS[head]
            out.append(f"\n**{head}** head (H={H}, V={V:,}), {sel[0].device}, {mode}: median us (speedup vs dense)\n")
            out.append("| batch | active | " + " | ".join(impls) + " |")
            out.append("|---:|---:|" + "---:|" * len(impls))
            for b in sorted({r.batch for r in sel}):
                for a in sorted({r.active for r in sel}):
                    cells = []
                    for i in impls:
                        r = next((x for x in sel if x.impl == i and x.batch == b and x.active == a), None)
                        if r is None:
                            cells.append("")
                        elif r.error:
                            cells.append("skipped" if r.error.startswith("skipped") else "error")
                        elif i == "dense" or r.speedup_vs_dense is None:
                            cells.append(f"{r.median_us:,.0f}" if r.median_us >= 100 else f"{r.median_us:.1f}")
                        else:
                            us = f"{r.median_us:,.0f}" if r.median_us >= 100 else f"{r.median_us:.1f}"
                            cells.append(f"{us} ({r.speedup_vs_dense:.1f}x)")
                    if any(cells):
                        out.append(f"| {b} | {a} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


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
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    if a.quick:
        heads, batches, actives = QUICK["heads"], QUICK["batches"], QUICK["actives"]
    else:
        heads, batches, actives = list(HEADS), BATCHES + (CUDA_EXTRA_BATCHES if cuda else []), ACTIVES
    s = Settings(
        device=a.device,
        warmup=3 if cuda else 1,
        min_reps=10 if cuda else 3,
        max_reps=200 if cuda else (10 if a.quick else 40),
        budget_s=a.budget_s if a.budget_s is not None else (0.05 if cuda else (0.1 if a.quick else 0.5)),
        flush=not a.warm,
        heads=a.heads or heads,
        batches=a.batches or batches,
        actives=sorted(a.actives or actives),
    )
    return s, a.json, a.markdown


def main(argv: list[str] | None = None) -> int:
    return micro_bench_main("nanospec bench kernels", argv, parse, markdown, run)


if __name__ == "__main__":
    sys.exit(main())
