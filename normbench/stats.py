"""The difference of two arms' means with its uncertainty: the one place where a claim that one arm
is higher or lower than another gets its confidence interval and p-value (scipy's t-tests).

Welch's test compares independent samples (no equal-variance assumption); the paired test compares
runs that share their seeds and data draws (seed i of one arm with seed i of the other).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b), its confidence interval and two-sided p-value, from n_a and n_b runs."""

    diff: float
    low: float
    high: float
    p: float
    n_a: int
    n_b: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def contains_zero(self) -> bool:
        return self.low <= 0 <= self.high


def _nan(n_a: int, n_b: int) -> Difference:
    return Difference(math.nan, math.nan, math.nan, math.nan, n_a, n_b)


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Difference:
    """Welch's t-test of mean(a) - mean(b); NaN where either side has fewer than 2 runs."""
    from scipy import stats

    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2:
        return _nan(len(a), len(b))
    result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(confidence)
    return Difference(sum(a) / len(a) - sum(b) / len(b), float(ci.low), float(ci.high), float(result.pvalue),
                      len(a), len(b))


def paired(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Difference:
    """The paired t-test of mean(a - b) over pairs (a[i], b[i]) that share a seed; NaN under 2 pairs."""
    from scipy import stats

    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    if len(a) < 2:
        return _nan(len(a), len(b))
    result = stats.ttest_rel(a, b)
    ci = result.confidence_interval(confidence)
    return Difference(sum(a) / len(a) - sum(b) / len(b), float(ci.low), float(ci.high), float(result.pvalue),
                      len(a), len(b))


def welch_of_differences(a: Sequence[float], b: Sequence[float], c: Sequence[float], d: Sequence[float],
                         confidence: float = 0.95) -> Difference:
    """(mean(a) - mean(b)) - (mean(c) - mean(d)) of four independent samples (an interaction: how much a gap
    changes between two settings): its standard error from each sample's variance, Welch-Satterthwaite degrees
    of freedom, a t interval and two-sided p; NaN where a sample has fewer than 2 runs or all four are constant.
    n_a, n_b count the runs of a and c, of b and d."""
    from scipy import stats

    samples = [[float(x) for x in s] for s in (a, b, c, d)]
    n_a, n_b = len(samples[0]) + len(samples[2]), len(samples[1]) + len(samples[3])
    if min(len(s) for s in samples) < 2:
        return _nan(n_a, n_b)
    means = [sum(s) / len(s) for s in samples]
    # the variance of each sample's mean, s^2 / n
    shares = [sum((x - m) ** 2 for x in s) / (len(s) - 1) / len(s) for s, m in zip(samples, means)]
    se = math.sqrt(sum(shares))
    if se == 0:
        return _nan(n_a, n_b)
    df = sum(shares) ** 2 / sum(v ** 2 / (len(s) - 1) for v, s in zip(shares, samples))
    diff = (means[0] - means[1]) - (means[2] - means[3])
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return Difference(diff, diff - half, diff + half, float(2 * stats.t.sf(abs(diff) / se, df)), n_a, n_b)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (in their order; NaN stays NaN and does not count):
    the i-th smallest of m becomes max over j <= i of min(1, (m - j + 1) p_(j)). It controls the chance of
    any false "higher" / "lower" in the family at the level it is read at."""
    finite = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[i] = running
    return adjusted
