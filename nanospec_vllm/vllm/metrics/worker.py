"""Worker side of the NanoSpec statistics: device counters, read back off the critical path (model-runner process).

Per step (:meth:`StepStats.drain`, called from ``sample_tokens``): the step's counters (target tokens and covered
ones at drafted positions, the ids refused by full sets, the set sizes at draft time) are packed on the device into
one int64 vector and copied into a host staging buffer with ``non_blocking=True`` (pinned memory on CUDA), with a
CUDA event recorded after the copy (:class:`nanospec_vllm.hostcopy.LaggedHostCopies`, shared with the break-even
guard); the device counters are zeroed (a device op). Then every staged step whose
event has completed (``Event.query()``, which never waits) is read from host memory and handed on as the payload.
So on CUDA a step's figures reach the front end one or a few steps later, never with a host wait; on CPU the
"device" is the host, every staged step is ready at once and the payload is the step's own (as before).

:attr:`StepStats.totals` (cumulative figures read in-process by benchmarks and tests) waits for the copies in
flight first: reading it syncs, so it is never called per step.

Cost per step: two scalar adds on the device per verification, one ``cat`` of a few small tensors, one small
device-to-host copy, one event; no host wait.
"""

from __future__ import annotations

from typing import Any

import torch

from ...hostcopy import LaggedHostCopies
from .transport import HOST_COUNTERS, PATH_COUNTERS

__all__ = ["StepStats"]

#: staged steps kept before the oldest one is waited for (the GPU is never this far behind in vLLM)
MAX_IN_FLIGHT = 8
_HEAD = 3  # target, covered, dropped; then the sizes


class StepStats:
    """Worker-side accumulator (one per runtime).

    ``device``: where the counters live; ``max_sizes``: how many set sizes one step records at most (the slot
    count); the host staging buffers (``MAX_IN_FLIGHT`` of ``3 + max_sizes`` int64, pinned on CUDA) are
    allocated once here.
    """

    def __init__(self, device: Any, max_sizes: int = 256) -> None:
        self.device = torch.device(device)
        self.max_sizes = int(max_sizes)
        self._copies = LaggedHostCopies(MAX_IN_FLIGHT, _HEAD + self.max_sizes, torch.int64, self.device, self._fold)
        self._ready: list[dict[str, Any]] = []
        self._totals = {"target": 0, "covered": 0, "size_sum": 0, "size_n": 0, **dict.fromkeys(HOST_COUNTERS, 0)}
        # host-side counters of the current step (see HOST_COUNTERS)
        self.no_slot = 0
        self.fallback = 0
        self.planned = 0
        self.guarded = 0
        self.guard_fires = 0
        self.sparse_rows = 0
        self.no_step = 0
        self.path_per_request = self.path_union = self.path_dense = 0
        self.reset()

    def count_path(self, path: str) -> None:
        """One draft step took ``path`` (``per_request``, ``union`` or ``dense``)."""
        name = f"path_{path}"
        if name not in PATH_COUNTERS:
            raise ValueError(f"unknown head path {path!r}")
        setattr(self, name, getattr(self, name) + 1)

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
        return [self._copies.buf]

    # ------------------------------------------------------------------ staging and reading
    def stage(self, pool: Any, impl: str = "") -> None:
        """Copy this step's device counters to a host staging buffer without waiting, and start a new step."""
        parts = [self.acc]
        in_use = pool.num_in_use
        parts.append(pool.dropped.sum().reshape(1) if in_use else self.acc.new_zeros(1))
        parts += self.sizes
        vec = torch.cat(parts)  # [_HEAD + n] on the device; wider than a ring row: a one-off buffer
        meta: dict[str, Any] = {"slots_in_use": in_use, "impl": impl}
        for k in HOST_COUNTERS:
            meta[k] = getattr(self, k)
            setattr(self, k, 0)
        self._copies.push(vec, meta)
        self.reset()

    def _fold(self, host: torch.Tensor, meta: dict[str, Any]) -> None:
        """One staged step, read from host memory (filled: no device read), into the totals and the ready list."""
        vals = host.tolist()
        target, covered, dropped, sizes = vals[0], vals[1], vals[2], vals[_HEAD:]
        tot = self._totals
        tot["target"] += target
        tot["covered"] += covered
        tot["size_sum"] += sum(sizes)
        tot["size_n"] += len(sizes)
        for k in HOST_COUNTERS:
            tot[k] += meta[k]
        self._ready.append({"sizes": sizes, "target": target, "covered": covered, "dropped_live": dropped, **meta})

    def drain(self, pool: Any, impl: str = "", wait: bool = False) -> dict[str, Any]:
        """Stage this step, then return the statistics of every staged step that is readable now, merged into
        one payload (``{}`` when none is: the figures come with a later step). ``wait=True`` waits for all."""
        from .transport import merge_payloads

        self.stage(pool, impl)
        self._copies.read(wait=wait)
        out = merge_payloads(self._ready) or {}
        self._ready.clear()
        return out

    def flush(self) -> None:
        """Wait for the copies in flight and fold them into :attr:`totals` (their payloads are still sent)."""
        self._copies.read(wait=True)

    @property
    def totals(self) -> dict[str, int]:
        """Cumulative host-side totals since the engine started (benchmarks read them in-process). Syncs."""
        self.flush()
        return self._totals
