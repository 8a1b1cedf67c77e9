"""NanoSpec's pinned-memory copies between host and device, in one place (no vLLM imports).

* device -> host, read later without a host wait (:class:`LaggedHostCopies`): the mechanism behind the statistics
  (:class:`.vllm.metrics.worker.StepStats`), the break-even guard's flags (:class:`.guard.CoverageGuard`) and the
  draft head's lagged step sizes (:class:`.vllm.head.SparseDraftHead`);
* host -> device, the step's index vectors in one non-blocking copy from a ring of pinned rows
  (:class:`IndexStaging`);
* one-off host tensors (prompt ids at admission, token lists vLLM hands over) go through
  :meth:`.state.ActiveVocabPool.to_device` (``pin_memory()`` + ``non_blocking``: the caching host allocator keeps
  the block until the copy has run; never waits).

When a copy may wait, and why: ``LaggedHostCopies.push`` waits for the oldest copy only when all ``ring`` rows are
still in flight, ``read(wait=True)`` waits by request (``StepStats.totals``, the TP guard); ``IndexStaging.put``
waits on the event of the row it is about to rewrite, recorded ``STAGING_RING`` steps earlier. In vLLM none of
these is ever pending by then: vLLM reads each step's sampled tokens on the host, which orders everything before.

:meth:`LaggedHostCopies.push` copies a small device vector into the next row of a ring of host buffers (pinned on
CUDA, allocated once) with ``non_blocking=True`` and records a CUDA event after it; :meth:`LaggedHostCopies.read`
hands the copies, oldest first, to the owner's ``on_read`` once their event has completed (``Event.query()``,
never a wait), or waits for them (``wait=True``). On CPU the "device" is the host: every copy is ready at once.
When every ring row is still in flight, ``push`` first waits for the oldest (the GPU is never that far behind in
vLLM). A vector wider than a row goes to a one-off buffer. Cost per push: one small copy and one event.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["STAGING_RING", "IndexStaging", "LaggedHostCopies", "PinnedPair"]

#: host staging rows in the ring: a row is rewritten only after the copy made from it STAGING_RING steps ago has run
STAGING_RING = 2


@dataclass
class _Copy:
    host: torch.Tensor  # filled by a non-blocking copy
    event: Any  # torch.cuda.Event recorded after the copy, or None when the device is the host
    meta: Any  # what the owner attached at push time


class LaggedHostCopies:
    """``ring`` host rows of ``width`` elements of ``dtype``; ``on_read(host_tensor, meta)`` folds one copy in."""

    def __init__(self, ring: int, width: int, dtype: torch.dtype, device: torch.device,
                 on_read: Callable[[torch.Tensor, Any], None]) -> None:
        self._cuda = torch.device(device).type == "cuda"
        pin = self._cuda and torch.cuda.is_available()
        self.buf = torch.zeros(ring, width, dtype=dtype, pin_memory=pin)
        self._next = 0
        self._pending: deque[_Copy] = deque()
        self._on_read = on_read

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, vec: torch.Tensor, meta: Any = None) -> None:
        """Start the copy of the 1-D device tensor ``vec``; ``meta`` comes back with it in ``on_read``."""
        n = vec.shape[0]
        ring, width = self.buf.shape
        if n <= width:
            if len(self._pending) >= ring:  # every ring row is still being filled: wait for the oldest
                self.read(wait=True, limit=1)
            host = self.buf[self._next, :n]
            self._next = (self._next + 1) % ring
        else:
            host = torch.empty(n, dtype=self.buf.dtype, pin_memory=self.buf.is_pinned())
        host.copy_(vec, non_blocking=True)  # on CPU a plain copy
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append(_Copy(host, event, meta))

    def read(self, wait: bool, limit: int | None = None) -> None:
        """Hand the copies in order to ``on_read``: those that have completed, or (``wait``) all of them."""
        done = 0
        while self._pending and (limit is None or done < limit):
            cp = self._pending[0]
            if cp.event is not None:
                if wait:
                    cp.event.synchronize()
                elif not cp.event.query():
                    break
            self._pending.popleft()
            self._on_read(cp.host, cp.meta)
            done += 1


class PinnedPair:
    """What :class:`IndexStaging` uses of vLLM's ``CpuGpuBuffer`` (pinned ``cpu`` + ``gpu`` tensors, ``np`` view);
    the default buffer outside vLLM."""

    def __init__(self, *size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.cpu = torch.zeros(*size, dtype=dtype, pin_memory=device.type == "cuda")
        self.gpu = torch.zeros_like(self.cpu, device=device)
        self.np = self.cpu.numpy()


class IndexStaging:
    """The per-step index vectors, staged on the host and copied to the device in one non-blocking copy.

    One pinned host + device pair (``buffer_cls``: vLLM's ``CpuGpuBuffer`` inside vLLM, :class:`PinnedPair`
    otherwise) of ``[STAGING_RING, 5 * max_rows]`` int64, allocated once. :meth:`put` writes the vectors side by side into the next host row (numpy, no tensor op), copies that row
    to the device with ``non_blocking=True`` and records a CUDA event; the row is reused ``STAGING_RING`` steps
    later, after waiting on that event (long completed by then: vLLM reads its own sampled tokens every step), so a
    pending copy never reads a host row being rewritten. Returns device views, valid until the same row is reused.
    """

    def __init__(self, max_rows: int, device: torch.device, buffer_cls: Any = None) -> None:
        self.device = device
        self.width = 5 * max(1, int(max_rows))  # slots + on/off rows (B together) + verified rows, drafts, starts
        self.buf = (buffer_cls or PinnedPair)(STAGING_RING, self.width, dtype=torch.int64, device=device)
        self._events: list[Any] = [None] * STAGING_RING
        self._next = 0

    def host_buffers(self) -> list[torch.Tensor]:
        return [self.buf.cpu]

    def put(self, *vectors: Sequence[int]) -> list[torch.Tensor]:
        n = sum(len(v) for v in vectors)
        if n > self.width:  # more rows than max_num_seqs (never in vLLM): a one-off pinned copy
            flat = torch.tensor([x for v in vectors for x in v], dtype=torch.int64)
            dev = flat if self.device.type == "cpu" else flat.pin_memory().to(self.device, non_blocking=True)
        else:
            k = self._next
            self._next = (k + 1) % STAGING_RING
            if self._events[k] is not None:
                self._events[k].synchronize()  # recorded STAGING_RING steps ago
            row = self.buf.np[k]
            o = 0
            for v in vectors:
                row[o: o + len(v)] = v
                o += len(v)
            dev = self.buf.gpu[k, :n]
            dev.copy_(self.buf.cpu[k, :n], non_blocking=True)
            if self.device.type == "cuda":
                ev = torch.cuda.Event()
                ev.record()
                self._events[k] = ev
        out, o = [], 0
        for v in vectors:
            out.append(dev[o: o + len(v)])
            o += len(v)
        return out
