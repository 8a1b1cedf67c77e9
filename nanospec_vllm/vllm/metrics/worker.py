"""Worker side of the NanoSpec statistics: device counters, drained once per step (model-runner process).

Cost: two scalar adds per step on the device, one read-back of them and of the step's set sizes at the drain.
"""

from __future__ import annotations

from typing import Any

__all__ = ["StepStats"]


class StepStats:
    """Worker-side accumulator (one per runtime)."""

    def __init__(self, device: Any) -> None:
        import torch

        self._torch = torch
        self.device = device
        self.reset()
        self.no_slot = 0
        self.fallback = 0
        #: cumulative host-side totals since the engine started (benchmarks read them in-process)
        self.totals = {"target": 0, "covered": 0, "size_sum": 0, "size_n": 0, "fallback": 0, "no_slot": 0}

    def reset(self) -> None:
        t = self._torch
        self.target = t.zeros((), dtype=t.int64, device=self.device)
        self.covered = t.zeros((), dtype=t.int64, device=self.device)
        self.sizes: list[Any] = []

    def add_coverage(self, target: Any, covered: Any) -> None:
        self.target += target
        self.covered += covered

    def record_sizes(self, counts: Any) -> None:
        self.sizes.append(counts.detach().clone())

    def drain(self, pool: Any, impl: str = "") -> dict[str, Any]:
        """One host sync: turn the device counters into plain ints and start a new step."""
        t = self._torch
        sizes = t.cat([s.reshape(-1).long() for s in self.sizes]).tolist() if self.sizes else []
        target, covered = (int(x) for x in t.stack([self.target, self.covered]).tolist())
        dropped = int(pool.dropped.sum()) if pool.num_in_use else 0
        tot = self.totals
        tot["target"] += target
        tot["covered"] += covered
        tot["size_sum"] += sum(sizes)
        tot["size_n"] += len(sizes)
        tot["fallback"] += self.fallback
        tot["no_slot"] += self.no_slot
        out = {
            "slots_in_use": pool.num_in_use,
            "sizes": sizes,
            "target": target,
            "covered": covered,
            "dropped_live": dropped,
            "no_slot": self.no_slot,
            "fallback": self.fallback,
            "impl": impl,
        }
        self.no_slot = 0
        self.fallback = 0
        self.reset()
        return out
