"""Shared parts of ``nanospec bench kernels``: head shapes, the row and settings records, the timer (cache flush,
CUDA events, graph replay), random inputs and the run header. Needs only torch."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ... import __version__
from ...ops import native
from .. import mem_available

#: (hidden, vocab rows) of the benchmarked heads (random bf16 weights of these shapes)
HEADS = {"qwen2.5-0.5b": (896, 151_936), "llama-3.1-8b": (4096, 128_256), "qwen2.5-1.5b": (1536, 151_936),
         "gemma-3-1b": (1152, 262_144)}
DEFAULT_HEADS = ["qwen2.5-0.5b", "llama-3.1-8b"]
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
    # --union rows: the set source, the sizes behind the row, and the path ``auto`` took
    sets: str | None = None
    sum_sets: int | None = None
    union_size: int | None = None
    union_rows: int | None = None  # the union buffer (bucket) the union rows used
    distinct: int | None = None  # distinct requests in the batch (a --sets file smaller than the batch repeats)
    path: str | None = None


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
    union: bool = False  # --union: the union / auto sweep (kernels_union.py)
    sets: str | None = None  # --sets FILE: real per-request id sets for the union sweep
    union_width: int = 3072  # ids per row of the union sweep's random full sets
    sets_only: bool = False  # --sets-only: skip the random full sets



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


def _random_ids(batch: int, width: int, vocab: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """``[batch, width]`` int32, distinct random ids per row."""
    keys = torch.rand(batch, vocab, generator=gen, device=gen.device)
    return keys.topk(width, dim=1).indices.to(device=device, dtype=torch.int32)



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



def _too_big(impl: str, batch: int, active: int, hidden: int, dev: torch.device) -> str | None:
    """The PyTorch reference materialises the gathered rows in bf16 and fp32 (6 bytes per weight element):
    skip it where that would not fit comfortably (batch 256 x 3,072 ids x 4096 needs 19 GB)."""
    if impl != "torch":
        return None
    need = batch * active * hidden * 6
    if dev.type == "cuda":
        have = torch.cuda.mem_get_info(dev)[0]
    else:  # MemAvailable (free + reclaimable page cache): free pages alone are ~0 once models are cached
        have = mem_available()
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


