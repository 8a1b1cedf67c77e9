"""The per-request break-even guard: a request whose running coverage falls below the break-even coverage drafts
with the full head until its coverage recovers (no vLLM imports; unit-tested in ``tests/unit/test_guard.py``).

Why: the sparse head makes a draft step cheaper, but a draft position whose target token is not active is a sure
rejection. Below some coverage the lost acceptance costs more than the cheaper steps save, and NanoSpec would be
the slower choice for that request. The offline model that gives that coverage from measured step costs
(``break_even_coverage``, printed by ``bench e2e``) is :mod:`.tools.breakeven`; this module holds only what runs
per step.

The rule, per slot, on the device (:func:`guard_update`): after every verification the slot's running counts are
``covered <- covered * d + c`` and ``drafted <- drafted * d + n`` with ``d = exp(-n / window)`` (``n`` target
tokens at drafted positions this step, ``c`` of them active when drafted): an exponential average over about
``window`` drafted positions. Once ``drafted >= window / 2`` (warm-up), a slot is *guarded* when
``covered / drafted < min_coverage`` and released when it reaches ``min_coverage + hysteresis``. A guarded
request keeps its slot and its set grows as usual (emitted tokens, the target's top-k), so its coverage is still
measured and it can recover. The full head's drafts of a guarded request are not added: they would be in the set
when the next verification is counted, and every accepted draft would then count as covered.

The host decides which rows draft with the sparse head, so it needs the flags: :class:`CoverageGuard` copies the
``[slots]`` flag vector into a pinned host ring with ``non_blocking=True`` after each update
(:class:`.hostcopy.LaggedHostCopies`, the statistics' mechanism too) and reads a copy
only once its CUDA event has completed (``Event.query()``, never a wait); the plan of a step uses the newest
flags that have arrived (on CPU: those of the previous step; on CUDA usually the same or one step older). A slot
re-seeded after a copy was issued ignores that copy. Under tensor parallelism every copy issued so far is taken
(``same_step_everywhere``), so all ranks plan alike. Folding an arrived copy into the host flags reads host
memory only (the pinned ring row, through a NumPy view) and is vectorised over the slots: no per-slot Python loop.
Cost per step: a few element-wise ops on ``[rows]`` and ``[slots]`` tensors on the device, one ``slots``-byte
copy and one event, and a few NumPy ops on ``[slots]`` host arrays; no host wait on a single rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .hostcopy import LaggedHostCopies

__all__ = ["CoverageGuard", "GuardParams", "guard_update"]

#: host copies of the flags in flight before the oldest is waited for (the GPU is never this far behind)
RING = 4


@dataclass(frozen=True)
class GuardParams:
    min_coverage: float  # guard below this running coverage (0: never)
    hysteresis: float = 0.05  # release at min_coverage + hysteresis
    window: float = 32.0  # drafted positions the running coverage averages over

    @property
    def enabled(self) -> bool:
        return self.min_coverage > 0.0


def guard_update(covered: torch.Tensor, drafted: torch.Tensor, guarded: torch.Tensor, n: torch.Tensor,
                 c: torch.Tensor, p: GuardParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One verification's update of some slots' running counts and flags (all ``[R]``; ``n`` and ``c`` the step's
    target tokens at drafted positions and the covered ones). Returns the new ``(covered, drafted, guarded)``."""
    n = n.to(drafted.dtype)
    d = torch.exp(-n / p.window)
    cov = covered * d + c.to(covered.dtype)
    dra = drafted * d + n
    rate = cov / dra.clamp_min(1e-6)
    warm = dra >= p.window / 2
    trip = warm & (rate < p.min_coverage)
    stay = rate < p.min_coverage + p.hysteresis
    return cov, dra, torch.where(guarded, stay, trip)


class CoverageGuard:
    """Per-slot running coverage and guard flags on the device, with lagged host copies of the flags.

    ``num_slots``: the pool's slot count. The host side (``flags``, ``fires``; NumPy arrays and counters in host
    memory) is read by the runtime when it plans a step; the device side is updated by :meth:`update` after each verification.

    ``same_step_everywhere`` (tensor parallelism): every rank must plan the same rows for the sparse head (its
    ranks gather each other's scores), so :meth:`poll` takes every copy issued so far, waiting on its event if it
    has not completed, instead of whichever copies happen to have arrived on this rank. The copy was issued in an
    earlier step, and vLLM has read that step's sampled tokens on the host since, so the wait returns at once in
    practice; on CPU there is nothing to wait for either way.
    """

    def __init__(self, num_slots: int, device: torch.device, params: GuardParams,
                 same_step_everywhere: bool = False) -> None:
        self.p = params
        self.same_step_everywhere = same_step_everywhere
        self.device = torch.device(device)
        self.num_slots = int(num_slots)
        self.covered = torch.zeros(self.num_slots, dtype=torch.float32, device=self.device)
        self.drafted = torch.zeros_like(self.covered)
        self.guarded = torch.zeros(self.num_slots, dtype=torch.bool, device=self.device)
        self._copies = LaggedHostCopies(RING, self.num_slots, torch.uint8, self.device, self._fold)
        self._step = 0
        self._seeded_at = np.full(self.num_slots, -1, dtype=np.int64)  # host step counter of each slot's last reset
        self._flags = np.zeros(self.num_slots, dtype=np.bool_)  # host view: the newest flags that have arrived
        self.fires = 0  # slots that went from sparse to full head (host view)

    def host_buffers(self) -> list[torch.Tensor]:
        return [self._copies.buf]

    def reset(self, slot: int) -> None:
        """A request was (re-)seeded into ``slot``: forget its running counts (device writes, no host read)."""
        self.covered[slot] = 0.0
        self.drafted[slot] = 0.0
        self.guarded[slot] = False
        self._flags[slot] = False
        self._seeded_at[slot] = self._step

    def update(self, slots: torch.Tensor, n: torch.Tensor, c: torch.Tensor) -> None:
        """After a verification: ``slots [R]`` (device, distinct), ``n``/``c [R]`` target tokens at drafted positions
        and covered ones. Device ops only."""
        cov, dra, g = guard_update(self.covered[slots], self.drafted[slots], self.guarded[slots], n, c, self.p)
        self.covered[slots] = cov
        self.drafted[slots] = dra
        self.guarded[slots] = g

    def stage(self) -> None:
        """Start the non-blocking copy of the flags to the host (once per step, after :meth:`update`)."""
        self._copies.push(self.guarded.to(torch.uint8), self._step)
        self._step += 1

    @property
    def flags(self) -> list[bool]:
        """The host flags per slot: the newest that have arrived (host memory)."""
        return self._flags.tolist()

    def poll(self) -> list[bool]:
        """Fold in every copy that has arrived (never waits), or every copy issued (``same_step_everywhere``);
        returns the host flags."""
        self._copies.read(wait=self.same_step_everywhere)
        return self.flags

    def _fold(self, host: torch.Tensor, issued: int) -> None:
        """One arrived copy (``host``: a filled row of the pinned ring, host memory) into the host flags, for
        every slot at once. A slot re-seeded after the copy was issued keeps its flag: the copy is about the
        previous request."""
        new = host.numpy() != 0  # a view of host memory: no copy, no device read
        take = self._seeded_at <= issued
        self.fires += int(np.count_nonzero(new & take & ~self._flags))
        np.copyto(self._flags, new, where=take)

    @staticmethod
    def describe(p: GuardParams) -> str:
        if not p.enabled:
            return "off"
        return (f"below {p.min_coverage:.2f} coverage (release at {p.min_coverage + p.hysteresis:.2f}, "
                f"window {p.window:g} drafted positions)")

