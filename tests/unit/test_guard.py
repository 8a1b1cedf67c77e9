"""The break-even guard (``nanospec_vllm/guard.py``): the hysteresis rule, the lagged host flags, and the batch
plan it feeds; and the offline break-even model that sets its threshold (``nanospec_vllm/tools/breakeven.py``)."""

from __future__ import annotations

import random

import pytest
import torch

from nanospec_vllm.config import NanoSpecConfigError, parse_config
from nanospec_vllm.guard import CoverageGuard, GuardParams, guard_update
from nanospec_vllm.step import plan_batch
from nanospec_vllm.tools.breakeven import break_even_coverage, tau_of


# ------------------------------------------------------------------------------------------------ break-even model
def test_break_even_k1_closed_form() -> None:
    """K=1: tau = 1 + alpha, so equal speed needs 1 + alpha * c = tau_f * r, c = (tau_f * r - 1) / (tau_f - 1)."""
    tau_f, full, sparse = 1.8, 100.0, 90.0
    want = (tau_f * 0.9 - 1) / (tau_f - 1)
    assert break_even_coverage(tau_f, full, sparse, 1) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize(("k", "tau_f"), [(k, t) for k in (2, 3, 4, 5) for t in (1.5, 2.5, 3.5) if t < k + 1])
def test_break_even_gives_equal_speed(k: int, tau_f: float) -> None:
    full, sparse = 200.0, 170.0
    c = break_even_coverage(tau_f, full, sparse, k)
    assert 0.0 < c < 1.0
    # recover alpha the same way a reader would: bisection on tau_of
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tau_of(mid, k) < tau_f else (lo, mid)
    alpha = lo
    assert tau_of(alpha * c, k) / sparse == pytest.approx(tau_f / full, rel=1e-6)
    # a cheaper sparse step tolerates a lower coverage; a better full head needs a higher one
    assert break_even_coverage(tau_f, full, 120.0, k) < c


def test_break_even_edges() -> None:
    assert break_even_coverage(3.0, 100.0, 100.0, 4) == 1.0  # no cheaper: never worth it below full coverage
    assert break_even_coverage(3.0, 100.0, 110.0, 4) == 1.0
    assert break_even_coverage(1.2, 100.0, 50.0, 4) == 0.0  # twice as cheap beats 1.2 tokens per step at c=0


# ------------------------------------------------------------------------------------------------ hysteresis rule
def _run(rates: list[tuple[int, int]], p: GuardParams) -> list[bool]:
    cov, dra, g = torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.bool)
    out = []
    for n, c in rates:
        cov, dra, g = guard_update(cov, dra, g, torch.tensor([n]), torch.tensor([c]), p)
        out.append(bool(g[0]))
    return out


def test_guard_waits_for_warm_up() -> None:
    p = GuardParams(0.9, 0.05, window=32)
    # the decayed count of drafted positions reaches window / 2 = 16 after ~window * ln 2 = 22 positions
    flags = _run([(4, 0)] * 8, p)  # all missed
    assert flags == [False] * 5 + [True] * 3


def test_guard_hysteresis() -> None:
    p = GuardParams(0.8, 0.1, window=8)
    low, high = (4, 2), (4, 4)  # per-step coverage 0.5 and 1.0
    flags = _run([high] * 4 + [low] * 4, p)
    assert flags[:4] == [False] * 4 and flags[-1] is True
    # once guarded, a rate between guard_coverage and guard_coverage + hysteresis keeps the guard on
    cov, dra, g = torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.bool)
    for _ in range(20):  # steady 0.85: never trips when starting free ...
        cov, dra, g = guard_update(cov, dra, g, torch.tensor([20]), torch.tensor([17]), p)
    assert not bool(g[0])
    g = torch.ones(1, dtype=torch.bool)  # ... and never releases when starting guarded
    for _ in range(20):
        cov, dra, g = guard_update(cov, dra, g, torch.tensor([20]), torch.tensor([17]), p)
    assert bool(g[0])
    for _ in range(20):  # steady 1.0 releases it
        cov, dra, g = guard_update(cov, dra, g, torch.tensor([4]), torch.tensor([4]), p)
    assert not bool(g[0])


def test_guard_matches_a_plain_python_model() -> None:
    """Random per-step counts for 3 slots, against a float-by-float model of the rule."""
    import math

    p = GuardParams(0.7, 0.1, window=16)
    rng = random.Random(0)
    cov, dra, g = torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.bool)
    m = [[0.0, 0.0, False] for _ in range(3)]
    for _ in range(200):
        n = [rng.randint(0, 5) for _ in range(3)]
        c = [rng.randint(0, x) if rng.random() < 0.7 else 0 for x in n]
        cov, dra, g = guard_update(cov, dra, g, torch.tensor(n), torch.tensor(c), p)
        for s in range(3):
            d = math.exp(-n[s] / p.window)
            m[s][0] = m[s][0] * d + c[s]
            m[s][1] = m[s][1] * d + n[s]
            rate = m[s][0] / max(m[s][1], 1e-6)
            if m[s][2]:
                m[s][2] = rate < p.min_coverage + p.hysteresis
            else:
                m[s][2] = m[s][1] >= p.window / 2 and rate < p.min_coverage
        assert g.tolist() == [x[2] for x in m]
        assert cov.tolist() == pytest.approx([x[0] for x in m], rel=1e-4)


# ------------------------------------------------------------------------------------------------ lagged host flags
def test_host_flags_arrive_one_step_later_and_reset_ignores_stale_copies() -> None:
    gd = CoverageGuard(4, torch.device("cpu"), GuardParams(0.9, 0.05, window=1))
    slots = torch.tensor([1, 2])
    gd.update(slots, torch.tensor([4, 4]), torch.tensor([0, 4]))  # slot 1 misses everything
    assert gd.poll() == [False] * 4  # nothing staged yet: the host has not seen it
    gd.stage()
    assert gd.poll() == [False, True, False, False] and gd.fires == 1
    assert gd.poll() == [False, True, False, False] and gd.fires == 1  # a flag that stays on fires once
    # slot 1 is re-seeded for a new request while a copy of the old flags is in flight
    gd.update(slots, torch.tensor([4, 4]), torch.tensor([0, 4]))
    gd.stage()
    gd.reset(1)
    assert gd.poll()[1] is False  # the stale copy is ignored for that slot
    assert float(gd.drafted[1]) == 0.0 and not bool(gd.guarded[1])
    gd.stage()
    assert gd.poll()[1] is False


def test_host_flags_match_a_per_slot_model_over_random_steps() -> None:
    """Random updates, re-seeds, stagings and polls (several copies in flight at once, re-seeds between them)
    on 8 slots: the host flags and the fire count equal a slot-by-slot model of the fold, which takes a copy for
    a slot only when the slot was not re-seeded after the copy was issued, and counts a fire on every off -> on."""
    p = GuardParams(0.7, 0.1, window=2)
    gd = CoverageGuard(8, torch.device("cpu"), p)
    rng = random.Random(1)
    step, seeded, flags, fires, stale = 0, [-1] * 8, [False] * 8, 0, 0
    pending: list[tuple[list[bool], int]] = []  # the copies staged and not yet polled, with their step
    for _ in range(400):
        act = rng.random()
        if act < 0.4:
            slots = rng.sample(range(8), rng.randint(1, 8))
            n = [rng.randint(0, 4) for _ in slots]
            c = [rng.randint(0, x) if rng.random() < 0.6 else 0 for x in n]
            gd.update(torch.tensor(slots), torch.tensor(n), torch.tensor(c))
        elif act < 0.55:
            s = rng.randrange(8)
            gd.reset(s)
            seeded[s], flags[s] = step, False
        elif act < 0.8 and len(pending) < 3:  # the ring has 4 rows: never make stage() wait here
            gd.stage()
            pending.append((gd.guarded.tolist(), step))
            step += 1
        else:
            for copy, issued in pending:
                for s, v in enumerate(copy):
                    if seeded[s] > issued:
                        stale += v != flags[s]  # a copy that would change a re-seeded slot's flag
                        continue
                    fires += v and not flags[s]
                    flags[s] = v
            pending.clear()
            assert gd.poll() == flags and gd.fires == fires
    assert fires > 3 and stale > 0  # the run exercised fires and stale copies that had to be ignored


class _SlowEvent:
    """A CUDA event stand-in whose copy has not completed until someone waits on it."""

    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


@pytest.mark.parametrize("same_step_everywhere", [False, True])
def test_tensor_parallel_ranks_take_the_same_copies(same_step_everywhere: bool) -> None:
    """Alone, a rank folds in only copies that have arrived (no wait); under tensor parallelism every rank takes
    every copy issued so far, so all ranks plan the same rows."""
    gd = CoverageGuard(2, torch.device("cpu"), GuardParams(0.9, 0.05, window=1), same_step_everywhere)
    gd.update(torch.tensor([0]), torch.tensor([4]), torch.tensor([0]))
    gd.stage()
    ev = _SlowEvent()
    gd._copies._pending[-1].event = ev  # as on CUDA, before the copy has run
    flags = gd.poll()
    assert flags[0] is same_step_everywhere and ev.waited is same_step_everywhere
    ev.done = True
    assert gd.poll()[0] is True  # arrived: taken either way


def test_on_by_default_off_at_zero_and_validated() -> None:
    """The default is the shipped 0.89 (``configs/nanospec.yaml``); 0 turns the guard off."""
    cfg = parse_config({})
    assert cfg.guard_coverage == 0.89 and GuardParams(cfg.guard_coverage).enabled
    off = parse_config({"guard_coverage": 0.0})
    assert not GuardParams(off.guard_coverage).enabled
    with pytest.raises(NanoSpecConfigError, match="guard_coverage"):
        parse_config({"guard_coverage": 1.5})
    with pytest.raises(NanoSpecConfigError, match="guard_window"):
        parse_config({"guard_window": 0})


# ------------------------------------------------------------------------------------------------ batch plan
def test_plan_batch_sends_guarded_slots_to_the_full_head() -> None:
    slot_of = {"a": 0, "b": None, "c": 2, "d": 3}.get
    plan = plan_batch(["a", "b", "c", "d"], slot_of, [False, False, True, False])
    assert plan.slots == (0, -1, 2, 3)
    assert plan.on_rows == (0, 3) and plan.guarded_rows == (2,) and plan.off_rows == (1, 2)
    assert plan.tracked_rows == (0, 2, 3)
    assert plan_batch(["a", "c"], slot_of).on_rows == (0, 1)  # no flags: no guard
