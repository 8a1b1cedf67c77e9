"""Device -> host copies read later without a host wait (no vLLM imports): the mechanism behind the statistics
(:class:`.vllm.metrics.worker.StepStats`) and the break-even guard's flags (:class:`.guard.CoverageGuard`).

:meth:`LaggedHostCopies.push` copies a small device vector into the next row of a ring of host buffers (pinned on
CUDA, allocated once) with ``non_blocking=True`` and records a CUDA event after it; :meth:`LaggedHostCopies.read`
hands the copies, oldest first, to the owner's ``on_read`` once their event has completed (``Event.query()``,
never a wait), or waits for them (``wait=True``). On CPU the "device" is the host: every copy is ready at once.
When every ring row is still in flight, ``push`` first waits for the oldest (the GPU is never that far behind in
vLLM). A vector wider than a row goes to a one-off buffer. Cost per push: one small copy and one event.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LaggedHostCopies"]


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
