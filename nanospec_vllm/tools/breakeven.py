"""The offline break-even model of the guard (``guard_coverage``): the running coverage at which drafting with the
sparse head is exactly as fast as with the full head, from measured step times and the full head's tau.

``bench e2e`` prints it per task group (``break_even_coverage``, :mod:`.bench.e2e.report`), the value to set
``guard_coverage`` to; the rule that acts on it per step is :mod:`nanospec_vllm.guard`. Unit-tested in
``tests/unit/test_guard.py``.

Limit, measured (``docs/benchmarks/e2e-cpu.md``): the model prices every miss as a lost acceptance; on benchmark
prompts a miss costs about half of that, so a guard set to this coverage can fire where the sparse head still wins.
"""

from __future__ import annotations

__all__ = ["break_even_coverage", "tau_of"]


def tau_of(alpha: float, k: int) -> float:
    """Expected tokens per verification with K drafts, each accepted with probability ``alpha`` independently
    until the first rejection: ``1 + alpha + ... + alpha^K``."""
    return sum(alpha ** i for i in range(k + 1))


def _alpha_of(tau: float, k: int) -> float:
    lo, hi = 0.0, 1.0
    tau = min(max(tau, 1.0), k + 1.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tau_of(mid, k) < tau else (lo, mid)
    return (lo + hi) / 2


def break_even_coverage(tau_full: float, step_ms_full: float, step_ms_sparse: float, k: int) -> float:
    """The coverage at which drafting with the sparse head is exactly as fast as with the full head.

    Model: with the full head every draft position is accepted with probability ``alpha`` (recovered from
    ``tau_full`` by :func:`tau_of`); with the sparse head a position can be accepted only when the target's token
    is active, and then whenever the full head's draft would have been (the full argmax, if active, is also the
    sparse argmax), so ``alpha_sparse = alpha * coverage``. Equal speed means
    ``tau_of(alpha * c) / step_ms_sparse = tau_full / step_ms_full``; returns that ``c`` (0 when the sparse step
    is so cheap that even no acceptance breaks even, 1 when it is not cheaper at all).
    """
    if step_ms_sparse >= step_ms_full:
        return 1.0
    alpha = _alpha_of(tau_full, k)
    need = tau_full * step_ms_sparse / step_ms_full
    if need <= 1.0 or alpha <= 0.0:
        return 0.0
    a = _alpha_of(need, k)
    return min(1.0, a / alpha)
