"""Draft-step benchmark: one EAGLE draft step with the dense lm_head vs NanoSpec's sparse head, at real shapes.

``python -m nanospec_vllm.tools.bench.draft_step --device cuda --json OUT.json`` (from a checkout without
installing: ``PYTHONPATH=.``), or ``nanospec bench draft-step``; ``--markdown OUT.json`` prints the tables of a
run; ``--device cpu --quick`` runs toy shapes (what the tests run).

One draft step of an EAGLE-1 head on a Llama-style target, batch ``B`` (one draft position per request), as vLLM
runs it on GPU: embedding lookup of the previous draft token, ``fc`` over ``[embedding, target hidden]``
(``2H -> H``), one decoder layer (RMSNorm, QKV projection (+bias for Qwen), RoPE, the new K/V written into a KV
cache of ``--context`` positions per request, GQA attention over it, output projection, RMSNorm, SiLU-gated MLP),
the final RMSNorm, then the head:

* ``layer``  -- no head at all (the step's floor: what the head adds is ``step - layer``);
* ``dense``  -- ``F.linear`` over the whole lm_head in bf16, then ``argmax`` (what vLLM's drafter does);
* ``sparse`` -- :func:`nanospec_vllm.ops.sparse_head` over each request's active ids (``auto``: the Triton kernel
  on CUDA; native C++ or PyTorch on CPU). Active sets are ragged: each request holds a uniform random number of
  ids in ``--active-min .. --active-max`` (default 1,024..3,072, mean ~2k: what the shipped policy keeps in
  ``docs/benchmarks/e2e-cpu.md``), distinct random ids in arrival order, ``-1`` padded to the capacity.

Shapes (random bf16 weights): Llama-3.1-8B (H=4096, V=128,256, 32 heads / 8 KV heads, MLP 14,336) and
Qwen2.5-7B (H=3584, V=152,064, 28 / 4 heads, MLP 18,944); head dim 128; batch 1..64.

Timing: on CUDA every configuration is captured once in a CUDA graph (the whole step) and its replay is timed with
CUDA events (median over repeats within ``--budget-s``); on CPU, eager calls timed with ``perf_counter``. No cache
flush: one step streams >0.5 GB of weights, far more than the L2. "GB/s" = bytes the step must read (weights,
embedding rows, the KV cache, the head rows it scores: all rows for ``dense``, ``sum(counts)`` rows + ids for
``sparse``) / median time. Each ``sparse`` row also records ``tokens_match`` (share of requests whose token equals
the fp32 argmax over their active ids, computed apart; must be 1.0) and, on CUDA, ``graph_matches_eager``.

Needs torch only (+ triton for the CUDA sparse head): it imports :mod:`nanospec_vllm.ops` and nothing that needs
vLLM, pydantic or yaml. Results are written to ``--json`` after every model (a cut-short run keeps what it
measured) as ``{"header": {...}, "rows": [...]}``. A full CUDA call takes a few minutes on an H200.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ... import __version__, ops
from ...ops.reference import raw_reference
from . import micro_bench_main


@dataclass(frozen=True)
class Shape:
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    inter: int
    qkv_bias: bool
    head_dim: int = 128


MODELS = {
    "llama-3.1-8b": Shape(4096, 128_256, 32, 8, 14_336, False),
    "qwen2.5-7b": Shape(3584, 152_064, 28, 4, 18_944, True),
}
TOY = {  # --quick: the same structure at toy size (CPU tests)
    "toy-llama": Shape(64, 4096, 4, 2, 160, False, head_dim=16),
    "toy-qwen": Shape(56, 5000, 4, 1, 176, True, head_dim=14),
}
BATCHES = [1, 2, 4, 8, 16, 32, 64]
QUICK_BATCHES = [1, 4]
KINDS = ("layer", "dense", "sparse")


@dataclass
class Row:
    model: str
    kind: str  # layer | dense | sparse
    impl: str  # what ran the head ("" for layer, "dense" for dense, the sparse_head implementation otherwise)
    device: str
    mode: str  # graph | eager
    batch: int
    context: int
    active_mean: float  # mean active-set size (sparse); 0 otherwise
    ms: float  # median milliseconds per draft step
    reps: int
    bytes: int  # bytes the step must read
    gbps: float  # bytes / median time
    speedup_vs_dense: float | None = None  # dense step time / this step time
    head_ms: float | None = None  # this step - the layer-only step
    tokens_match: float | None = None
    graph_matches_eager: bool | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------------------- the model
class Weights:
    """Random bf16 weights of one EAGLE draft layer + embedding + lm_head (shared by every batch size)."""

    def __init__(self, s: Shape, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> None:
        def w(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) / math.sqrt(shape[-1])
                    ).to(dtype)

        H, d = s.hidden, s.head_dim
        qkv = (s.heads + 2 * s.kv_heads) * d
        self.emb = _chunked(lambda n: w(n, H), s.vocab)
        self.head = _chunked(lambda n: w(n, H), s.vocab)
        self.fc = w(H, 2 * H)
        self.wqkv = w(qkv, H)
        self.bqkv = w(qkv) if s.qkv_bias else None
        self.wo = w(H, s.heads * d)
        self.wgu = w(2 * s.inter, H)
        self.wdown = w(H, s.inter)
        self.ln = [torch.ones(H, device=device, dtype=dtype) for _ in range(3)]

    def layer_bytes(self) -> int:
        ts = [self.fc, self.wqkv, self.wo, self.wgu, self.wdown, *self.ln] + ([self.bqkv] if self.bqkv is not None
                                                                           else [])
        return sum(t.numel() * t.element_size() for t in ts)


def _chunked(make: Callable[[int], torch.Tensor], rows: int, chunk: int = 16_384) -> torch.Tensor:
    return torch.cat([make(min(chunk, rows - i)) for i in range(0, rows, chunk)])


class DraftStep:
    """Static inputs and buffers of one (model, batch, head) configuration; calling it runs one draft step and
    returns the draft tokens ``[B]`` (graph-capturable: fixed shapes, no host sync)."""

    def __init__(self, s: Shape, w: Weights, batch: int, context: int, kind: str, ids: torch.Tensor | None,
                 counts: torch.Tensor | None, impl: str, gen: torch.Generator) -> None:
        dev, dt = w.head.device, w.head.dtype
        self.s, self.w, self.kind, self.impl = s, w, kind, impl
        self.ids, self.counts = ids, counts
        B, H, d = batch, s.hidden, s.head_dim
        self.tok = torch.randint(0, s.vocab, (B,), generator=gen, device=dev)
        self.hidden = torch.randn(B, H, generator=gen, device=dev, dtype=torch.float32).to(dt)
        self.kc = torch.randn(B, s.kv_heads, context, d, generator=gen, device=dev, dtype=torch.float32).to(dt)
        self.vc = torch.randn(B, s.kv_heads, context, d, generator=gen, device=dev, dtype=torch.float32).to(dt)
        inv = 1.0 / (10_000.0 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
        ang = (context - 1) * inv
        self.cos = torch.cat([ang.cos(), ang.cos()]).to(dt)
        self.sin = torch.cat([ang.sin(), ang.sin()]).to(dt)
        self.out = torch.zeros(B, dtype=torch.int64, device=dev)

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos + rot * self.sin

    def final_hidden(self) -> torch.Tensor:
        s, w = self.s, self.w
        B, d = self.tok.shape[0], s.head_dim
        x = F.linear(torch.cat([w.emb[self.tok], self.hidden], dim=-1), w.fc)
        r = x
        x = F.rms_norm(x, (s.hidden,), w.ln[0], 1e-6)
        qkv = F.linear(x, w.wqkv, w.bqkv)
        q, k, v = qkv.split([s.heads * d, s.kv_heads * d, s.kv_heads * d], dim=-1)
        q = self._rope(q.view(B, s.heads, 1, d))
        k = self._rope(k.view(B, s.kv_heads, 1, d))
        self.kc[:, :, -1:].copy_(k)  # the new position's K/V go into the cache (last slot)
        self.vc[:, :, -1:].copy_(v.view(B, s.kv_heads, 1, d))
        a = _sdpa_gqa(q, self.kc, self.vc)
        x = r + F.linear(a.reshape(B, s.heads * d), w.wo)
        r = x
        g, u = F.linear(F.rms_norm(x, (s.hidden,), w.ln[1], 1e-6), w.wgu).chunk(2, dim=-1)
        x = r + F.linear(F.silu(g) * u, w.wdown)
        return F.rms_norm(x, (s.hidden,), w.ln[2], 1e-6)

    def __call__(self) -> torch.Tensor:
        x = self.final_hidden()
        if self.kind == "layer":
            self.out.copy_(x[:, 0].long())  # keep the layer's result alive; no head
        elif self.kind == "dense":
            self.out.copy_(F.linear(x, self.w.head).argmax(dim=-1))
        else:
            self.out.copy_(ops.sparse_head(x, self.w.head, self.ids, self.counts, impl=self.impl).token_ids)
        return self.out

    def bytes(self) -> int:
        s, w = self.s, self.w
        B, C = self.tok.shape[0], 0 if self.ids is None else self.ids.shape[1]
        el = w.head.element_size()
        n = w.layer_bytes() + B * s.hidden * el * 2 + 2 * self.kc.numel() * el  # + embedding rows, hidden, K/V
        if self.kind == "dense":
            n += w.head.numel() * el
        elif self.kind == "sparse":
            n += int(self.counts.sum()) * s.hidden * el + B * C * self.ids.element_size()
        return n


def _sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    try:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    except TypeError:  # torch < 2.5: repeat the KV heads
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))


def ragged_sets(batch: int, vocab: int, lo: int, hi: int, device: torch.device,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, hi] int32, counts [B] int32)``: each row holds ``counts[b]`` (uniform in ``lo..hi``) distinct
    random ids in random order, ``-1`` after them."""
    counts = torch.randint(lo, hi + 1, (batch,), generator=gen, device=device)
    perm = torch.rand(batch, vocab, generator=gen, device=device).argsort(dim=1)[:, :hi]
    col = torch.arange(hi, device=device)[None, :]
    ids = torch.where(col < counts[:, None], perm, torch.full_like(perm, -1))
    return ids.to(torch.int32), counts.to(torch.int32)


def reference_tokens(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """fp32 argmax over each row's active ids (ties to the lowest id), one row at a time (bounded memory)."""
    return torch.cat([raw_reference(x[b: b + 1], w, ids[b: b + 1], counts[b: b + 1])[1] for b in range(x.shape[0])])


# ---------------------------------------------------------------------------------------------------- timing
@dataclass
class Settings:
    device: str
    models: dict[str, Shape]
    batches: list[int]
    context: int
    active_min: int
    active_max: int
    budget_s: float
    min_reps: int
    max_reps: int
    graphs: bool
    seed: int = 0


def _time_eager(fn: Callable[[], object], s: Settings) -> tuple[float, int]:
    fn()
    ts: list[float] = []
    deadline = time.perf_counter() + s.budget_s
    while len(ts) < s.max_reps and (len(ts) < s.min_reps or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, len(ts)


def _time_cuda(fn: Callable[[], object], s: Settings) -> tuple[float, int]:
    dev = torch.device(s.device)
    fn()
    torch.cuda.synchronize(dev)
    ts: list[float] = []
    deadline = time.perf_counter() + s.budget_s
    while len(ts) < s.max_reps and (len(ts) < s.min_reps or time.perf_counter() < deadline):
        n = min(10, s.max_reps - len(ts))
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for a, b in ev:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize(dev)
        ts.extend(a.elapsed_time(b) for a, b in ev)
    return statistics.median(ts), len(ts)


def _capture(fn: Callable[[], object], dev: torch.device) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up (Triton compiles, cuBLAS picks its kernels) outside the capture
            fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def measure(step: DraftStep, s: Settings) -> tuple[float, int, str, bool | None]:
    """(median ms, repeats, mode, graph replay == eager tokens) of one configuration."""
    dev = torch.device(s.device)
    if dev.type == "cuda" and s.graphs:
        eager = step().clone()
        graph = _capture(step, dev)
        try:
            graph.replay()
            torch.cuda.synchronize(dev)
            same = bool(torch.equal(step.out, eager))
            ms, reps = _time_cuda(graph.replay, s)
        finally:
            del graph
            torch.cuda.synchronize(dev)
        return ms, reps, "graph", same
    timer = _time_cuda if dev.type == "cuda" else _time_eager
    ms, reps = timer(step, s)
    return ms, reps, "eager", None


# ---------------------------------------------------------------------------------------------------- the run
def _header(argv: list[str], s: Settings) -> dict:
    h = {"bench": "draft_step", "argv": argv, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
         "nanospec_vllm": __version__, "torch": torch.__version__, "python": platform.python_version(),
         "device": s.device, "context": s.context, "active_min": s.active_min, "active_max": s.active_max,
         "sparse_impl": ops.resolve_impl("auto", s.device), "host": platform.node()}
    try:
        import triton

        h["triton"] = triton.__version__
    except ImportError:
        h["triton"] = None
    if s.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        h["gpu"] = p.name
        h["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        h["cuda"] = torch.version.cuda
    try:
        h["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                     cwd=Path(__file__).resolve().parent, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        h["commit"] = None
    return h


def run(s: Settings, argv: list[str], json_path: str | None) -> list[Row]:
    dev = torch.device(s.device)
    impl = ops.resolve_impl("auto", dev)
    header = _header(argv, s)
    rows: list[Row] = []
    t_start = time.perf_counter()

    def save() -> None:
        if json_path:
            header["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            with open(json_path, "w") as f:
                json.dump({"header": header, "rows": [asdict(r) for r in rows]}, f, indent=1)

    print(f"draft step on {s.device} ({header.get('gpu', platform.processor() or 'cpu')}), sparse head: {impl}, "
          f"context {s.context}, active ids {s.active_min}..{s.active_max} per request", flush=True)
    for name, shape in s.models.items():
        gen = torch.Generator(device=dev).manual_seed(s.seed)
        t0 = time.perf_counter()
        w = Weights(shape, dev, torch.bfloat16, gen)
        print(f"\n{name}: H={shape.hidden} V={shape.vocab:,} heads={shape.heads}/{shape.kv_heads} "
              f"MLP={shape.inter:,} (weights ready in {time.perf_counter() - t0:.1f} s)", flush=True)
        print(f"{'batch':>5} {'kind':>7} {'ms/step':>9} {'GB/s':>8} {'vs dense':>8} {'head ms':>8} {'match':>6}")
        for batch in s.batches:
            ids, counts = ragged_sets(batch, shape.vocab, s.active_min, s.active_max, dev, gen)
            by_kind: dict[str, Row] = {}
            for kind in KINDS:
                step = DraftStep(shape, w, batch, s.context, kind, ids if kind == "sparse" else None,
                                 counts if kind == "sparse" else None, impl, gen)
                row = Row(model=name, kind=kind, impl={"layer": "", "dense": "dense"}.get(kind, impl),
                          device=s.device, mode="", batch=batch, context=s.context,
                          active_mean=float(counts.float().mean()) if kind == "sparse" else 0.0, ms=float("nan"),
                          reps=0, bytes=step.bytes(), gbps=float("nan"))
                try:
                    row.ms, row.reps, row.mode, row.graph_matches_eager = measure(step, s)
                    row.gbps = row.bytes / (row.ms * 1e-3) / 1e9
                    if kind == "sparse":
                        x = step.final_hidden()
                        want = reference_tokens(x, w.head, ids, counts)
                        got = ops.sparse_head(x, w.head, ids, counts, impl=impl).token_ids
                        row.tokens_match = float((got == want).float().mean())
                except Exception as e:  # noqa: BLE001 - record it and go on (OOM at a shape must not lose the run)
                    row.error = f"{type(e).__name__}: {e}"[:300]
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                del step
                by_kind[kind] = row
                rows.append(row)
            layer, dense = by_kind["layer"], by_kind["dense"]
            for r in by_kind.values():
                if r.error is None and dense.error is None:
                    r.speedup_vs_dense = dense.ms / r.ms
                if r.kind != "layer" and r.error is None and layer.error is None:
                    r.head_ms = r.ms - layer.ms
                print(f"{batch:>5} {r.kind:>7} {r.ms:>9.3f} {r.gbps:>8.0f} "
                      f"{'' if r.speedup_vs_dense is None else f'{r.speedup_vs_dense:.2f}x':>8} "
                      f"{'' if r.head_ms is None else f'{r.head_ms:.3f}':>8} "
                      f"{'' if r.tokens_match is None else f'{r.tokens_match:.2f}':>6}"
                      + (f"  {r.error}" if r.error else ""), flush=True)
        del w
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        save()
    save()
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s" + (f"; wrote {json_path}" if json_path else ""))
    return rows


def markdown(data: dict) -> str:
    """Markdown tables (per model: ms per step, GB/s, sparse vs dense) from a ``--json`` file's content."""
    rows = [Row(**r) for r in data["rows"]]
    h = data.get("header", {})
    title = (f"Draft step (EAGLE layer + head), {h.get('device')} {h.get('gpu', '')}, context {h.get('context')}, "
             f"active ids {h.get('active_min')}..{h.get('active_max')} per request, sparse head "
             f"`{h.get('sparse_impl')}`, {h.get('date', '')[:10]}")
    out = [title]
    for model in dict.fromkeys(r.model for r in rows):
        sel = [r for r in rows if r.model == model]
        out.append(f"\n**{model}** ({sel[0].mode or 'n/a'}): ms per step (GB/s)\n")
        out.append("| batch | layer only | dense head | sparse head | sparse vs dense | head ms dense / sparse |"
                   " tokens match |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|")
        for b in sorted({r.batch for r in sel}):
            k = {r.kind: r for r in sel if r.batch == b}

            def cell(r: Row | None) -> str:
                if r is None:
                    return ""
                return "error" if r.error else f"{r.ms:.3f} ({r.gbps:,.0f})"

            sp, de = k.get("sparse"), k.get("dense")
            ratio = f"{sp.speedup_vs_dense:.2f}x" if sp and sp.speedup_vs_dense else ""
            heads = (f"{de.head_ms:.3f} / {sp.head_ms:.3f}" if de and sp and de.head_ms is not None
                     and sp.head_ms is not None else "")
            match = f"{sp.tokens_match:.2f}" if sp and sp.tokens_match is not None else ""
            out.append(f"| {b} | {cell(k.get('layer'))} | {cell(de)} | {cell(sp)} | {ratio} | {heads} | {match} |")
    return "\n".join(out) + "\n"


def parse(argv: list[str]) -> tuple[Settings, str | None, str | None]:
    p = argparse.ArgumentParser(prog="nanospec bench draft-step", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="toy shapes, batch 1 and 4 (tests; any device)")
    p.add_argument("--json", metavar="PATH", help="write header + rows here (after every model)")
    p.add_argument("--markdown", metavar="JSON", help="print the tables of an earlier --json run as markdown")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), help="override the model shapes")
    p.add_argument("--batches", nargs="+", type=int, help="override the batch sizes")
    p.add_argument("--context", type=int, help="KV positions per request (default 1024; 32 with --quick)")
    p.add_argument("--active-min", type=int, help="smallest active set (default 1024; 48 with --quick)")
    p.add_argument("--active-max", type=int, help="largest active set = capacity (default 3072; 160 with --quick)")
    p.add_argument("--budget-s", type=float, help="time budget per configuration (default 0.25 CUDA, 0.05 CPU)")
    p.add_argument("--eager", action="store_true", help="CUDA: time eager launches instead of graph replays")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    models = TOY if a.quick else {m: MODELS[m] for m in (a.models or MODELS)}
    s = Settings(
        device=a.device, models=models,
        batches=a.batches or (QUICK_BATCHES if a.quick else BATCHES),
        context=a.context or (32 if a.quick else 1024),
        active_min=a.active_min or (48 if a.quick else 1024),
        active_max=a.active_max or (160 if a.quick else 3072),
        budget_s=a.budget_s if a.budget_s is not None else (0.25 if cuda else 0.05),
        min_reps=10 if cuda else 3, max_reps=300 if cuda else 20, graphs=not a.eager,
    )
    if not 1 <= s.active_min <= s.active_max:
        p.error("need 1 <= --active-min <= --active-max")
    if min(m.vocab for m in models.values()) < s.active_max:
        p.error("--active-max exceeds a vocabulary")
    return s, a.json, a.markdown


def _setup(s: Settings) -> None:
    torch.manual_seed(s.seed)
    if os.environ.get("NANOSPEC_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["NANOSPEC_BENCH_THREADS"]))


def main(argv: list[str] | None = None) -> int:
    return micro_bench_main("nanospec bench draft-step", argv, parse, markdown, run, _setup)


if __name__ == "__main__":
    sys.exit(main())
