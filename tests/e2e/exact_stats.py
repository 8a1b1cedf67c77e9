"""Two-sample chi-square test of homogeneity, in plain Python (no scipy): used by ``test_exact_sampling.py``.

:func:`chi2_homogeneity` compares two samples of hashable categories (e.g. ``(prompt, token 2, token 3)``):
categories whose expected count is below ``min_expected`` in either sample are pooled into one "other" bin
(merged into the rarest kept category when still too small), then Pearson's statistic over the 2 x C table and
its upper-tail p-value with ``C - 1`` degrees of freedom. :func:`chi2_sf` is the regularized upper incomplete
gamma ``Q(df/2, x/2)`` (series / continued fraction, as in Numerical Recipes 6.2), accurate to ~1e-12.
Cost: O(number of observations).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

__all__ = ["Chi2Result", "chi2_homogeneity", "chi2_sf"]

_EPS = 1e-15
_ITMAX = 10_000


def _gamma_p_series(a: float, x: float) -> float:
    """Regularized lower incomplete gamma P(a, x) by its series (converges fast for x < a + 1)."""
    term = total = 1.0 / a
    ap = a
    for _ in range(_ITMAX):
        ap += 1.0
        term *= x / ap
        total += term
        if abs(term) < abs(total) * _EPS:
            break
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _gamma_q_cf(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) by Lentz's continued fraction (for x >= a + 1)."""
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, _ITMAX):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be >= 1 (got {df})")
    if x <= 0.0:
        return 1.0
    a, half = df / 2.0, x / 2.0
    if half < a + 1.0:
        return max(0.0, 1.0 - _gamma_p_series(a, half))
    return _gamma_q_cf(a, half)


@dataclass(frozen=True)
class Chi2Result:
    statistic: float
    df: int
    p_value: float
    categories: list[Hashable]  # kept categories, the pooled bin last (``"<other>"``) when there is one
    counts_a: list[int]
    counts_b: list[int]

    def table(self, limit: int = 12) -> str:
        """The most frequent rows of the table, for failure messages and the docs."""
        rows = sorted(zip(self.categories, self.counts_a, self.counts_b), key=lambda r: -(r[1] + r[2]))
        return "\n".join(f"  {c!r}: {a} vs {b}" for c, a, b in rows[:limit])


def chi2_homogeneity(a: Sequence[Hashable], b: Sequence[Hashable], min_expected: float = 5.0) -> Chi2Result:
    """Pearson's chi-square test that samples ``a`` and ``b`` come from the same categorical distribution."""
    na, nb = len(a), len(b)
    if na == 0 or nb == 0:
        raise ValueError("both samples must be non-empty")
    ca, cb = Counter(a), Counter(b)
    n = na + nb
    # expected count of a category in the smaller sample = min(na, nb) * total / n: keep those >= min_expected
    need = min_expected * n / min(na, nb)
    cats = sorted(set(ca) | set(cb), key=lambda c: (-(ca[c] + cb[c]), repr(c)))
    kept = [c for c in cats if ca[c] + cb[c] >= need]
    rest = [c for c in cats if ca[c] + cb[c] < need]
    rows_a = [ca[c] for c in kept]
    rows_b = [cb[c] for c in kept]
    labels: list[Hashable] = list(kept)
    if rest:
        oa, ob = sum(ca[c] for c in rest), sum(cb[c] for c in rest)
        if oa + ob >= need or not kept:
            labels.append("<other>")
            rows_a.append(oa)
            rows_b.append(ob)
        else:  # too small on its own: fold into the rarest kept category
            rows_a[-1] += oa
            rows_b[-1] += ob
            labels[-1] = (labels[-1], "<other>")
    if len(labels) < 2:
        return Chi2Result(0.0, 0, 1.0, labels, rows_a, rows_b)
    stat = 0.0
    for oa, ob in zip(rows_a, rows_b):
        tot = oa + ob
        ea, eb = na * tot / n, nb * tot / n
        stat += (oa - ea) ** 2 / ea + (ob - eb) ** 2 / eb
    df = len(labels) - 1
    return Chi2Result(stat, df, chi2_sf(stat, df), labels, rows_a, rows_b)
