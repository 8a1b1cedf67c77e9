"""Worker side of the NanoSpec statistics: device counters, read back off the critical path (model-runner process).

Per step (:meth:`StepStats.drain`, called from ``sample_tokens``): the step's counters (target tokens and covered
ones at drafted positions, the ids refused by full sets, the set sizes at draft time) are packed on the device into
one int64 vector and copied into a host staging buffer with ``non_blocking=True`` (pinned memory on CUDA), with a
CUDA event recorded after the copy; the device counters are zeroed (a device op). Then every staged step whose
event has completed (``Event.query()``, which never waits) is read from host memory and handed on as the payload.
So on CUDA a step's figures reach the front end one or a few steps later, never with a host wait; on CPU the
"device" is the host, every staged step is ready at once and the payload is the step's own (as before).

:attr:`StepStats.totals` (cumulative figures read in-process by benchmarks and tests) waits for the copies in
flight first: reading it syncs, so it is never called per step.

Cost per step: two scalar adds on the device per verification, one ``cat`` of a few small tensors, one small
device-to-host copy, one event; no host wait.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["HOST_COUNTERS", "StepStats"]

#: staged steps kept before the oldest one is waited for (the GPU is never this far behind in vLLM)
MAX_IN_FLIGHT = 8
_HEAD = 3  # target, covered, dropped; then the sizes
#: host-side per-step counters: requests that got no slot, draft calls handed to vLLM's head (parallel drafting,
#: soft cap), NanoSpec rows planned for drafting, those of them the break-even guard sent to the full head, and
#: guard trips (a request going from the sparse to the full head)
HOST_COUNTERS = ("no_slot", "fallback", "planned", "guarded", "guard_fires")


@dataclass
class _Staged:
    host: torch.Tensor  # [_HEAD + n] int64 on the host (pinned on CUDA), being filled by a non-blocking copy
    event: Any  # torch.cuda.Event recorded after the copy, or None when the device is the host
    meta: dict[str, Any]  # host-side figures of that step (slots in use, fallbacks, impl)


class StepStats:
    """Worker-side accumulator (one per runtime).

    ``device``: where the counters live; ``max_sizes``: how many set sizes one step records at most (the slot
    count); the host staging buffers (``MAX_IN_FLIGHT`` of ``3 + max_sizes`` int64, pinned on CUDA) are
    allocated once here.
    """

    def __init__(self, device: Any, max_sizes: int = 256) -> None:
        self.device = torch.device(device)
        self.max_sizes = int(max_sizes)
        self._cuda = self.device.type == "cuda"
        pin = self._cuda and torch.cuda.is_available()
        width = _HEAD + self.max_sizes
        self._host = torch.zeros(MAX_IN_FLIGHT, width, dtype=torch.int64, pin_memory=pin)
        self._next = 0
        self._pending: deque[_Staged] = deque()
        self._ready: list[dict[str, Any]] = []
        self._totals = {"target": 0, "covered": 0, "size_sum": 0, "size_n": 0, **dict.fromkeys(HOST_COUNTERS, 0)}
        # host-side counters of the current step (see HOST_COUNTERS)
        self.no_slot = 0
        self.fallback = 0
        self.planned = 0
        self.guarded = 0
        self.guard_fires = 0
        self.reset()

    def reset(self) -> None:
        """Start a new step's device counters (``acc = [target, covered]``) and size list."""
        self.acc = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.sizes: list[torch.Tensor] = []

    @property
    def target(self) -> torch.Tensor:
        return self.acc[0]

    @property
    def covered(self) -> torch.Tensor:
        return self.acc[1]

    def add_coverage(self, target: torch.Tensor, covered: torch.Tensor) -> None:
        """Add this verification's counts (0-dim device tensors) to the step's counters (one device add)."""
        self.acc += torch.stack([target.reshape(()), covered.reshape(())]).to(torch.int64)

    def record_sizes(self, counts: torch.Tensor) -> None:
        self.sizes.append(counts.detach().reshape(-1).to(torch.int64, copy=True))

    def host_buffers(self) -> list[torch.Tensor]:
        """The host staging memory (what reading a payload touches; tests check that nothing else is read)."""
        return [self._host]

    # ------------------------------------------------------------------ staging and reading
    def stage(self, pool: Any, impl: str = "") -> None:
        """Copy this step's device counters to a host staging buffer without waiting, and start a new step."""
        parts = [self.acc]
        in_use = pool.num_in_use
        parts.append(pool.dropped.sum().reshape(1) if in_use else self.acc.new_zeros(1))
        parts += self.sizes
        vec = torch.cat(parts)  # [_HEAD + n] on the device
        n = vec.shape[0]
        if n <= self._host.shape[1]:
            if len(self._pending) >= MAX_IN_FLIGHT:  # every ring buffer is still being filled: wait for the oldest
                self._collect(wait=True, limit=1)
            host = self._host[self._next, :n]
            self._next = (self._next + 1) % MAX_IN_FLIGHT
        else:  # more sizes than slots (several proposals in one step): a one-off buffer
            host = torch.empty(n, dtype=torch.int64, pin_memory=self._host.is_pinned())
        host.copy_(vec, non_blocking=True)  # on CPU a plain copy
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
        meta: dict[str, Any] = {"slots_in_use": in_use, "impl": impl}
        for k in HOST_COUNTERS:
            meta[k] = getattr(self, k)
            setattr(self, k, 0)
        self._pending.append(_Staged(host, event, meta))
        self.reset()

    def _collect(self, wait: bool, limit: int | None = None) -> None:
        """Read staged steps in order: those whose copy has completed, or (``wait``) all of them."""
        done = 0
        while self._pending and (limit is None or done < limit):
            st = self._pending[0]
            if st.event is not None:
                if wait:
                    st.event.synchronize()
                elif not st.event.query():
                    break
            self._pending.popleft()
            vals = st.host.tolist()  # host memory, filled: no device read
            target, covered, dropped, sizes = vals[0], vals[1], vals[2], vals[_HEAD:]
            tot = self._totals
            tot["target"] += target
            tot["covered"] += covered
            tot["size_sum"] += sum(sizes)
            tot["size_n"] += len(sizes)
            for k in HOST_COUNTERS:
                tot[k] += st.meta[k]
            self._ready.append({"sizes": sizes, "target": target, "covered": covered, "dropped_live": dropped,
                                **st.meta})
            done += 1

    def drain(self, pool: Any, impl: str = "", wait: bool = False) -> dict[str, Any]:
        """Stage this step, then return the statistics of every staged step that is readable now, merged into
        one payload (``{}`` when none is: the figures come with a later step). ``wait=True`` waits for all."""
        from .transport import merge_payloads

        self.stage(pool, impl)
        self._collect(wait=wait)
        out = merge_payloads(self._ready) or {}
        self._ready.clear()
        return out

    def flush(self) -> None:
        """Wait for the copies in flight and fold them into :attr:`totals` (their payloads are still sent)."""
        self._collect(wait=True)

    @property
    def totals(self) -> dict[str, int]:
        """Cumulative host-side totals since the engine started (benchmarks read them in-process). Syncs."""
        self.flush()
        return self._totals
