"""Statistics for comparing methods over seeds and test questions (pure functions of NumPy arrays).

Shape suffixes: `_s` seeds, `_q` test questions, `_sq` both (one row per seed, the same questions in
every row's columns only within that seed).

- `t_interval(x_s)`: mean, sample standard deviation and the two-sided Student-t interval
  mean ± t(1 - alpha / 2, n - 1) · sd / sqrt(n) over seeds.
- `paired_t(a_s, b_s)`: the same interval for the per-seed differences d = a - b, with the two-sided
  p-value 2 · (1 - F_t(|mean(d)| / (sd(d) / sqrt(n)), n - 1)) of "no difference".
- `paired_bootstrap(a_sq, b_sq)`: the mean over seeds and questions of d = a - b, with a percentile
  interval from resampling each seed's questions with replacement (every method resampled with the same
  indices, so the pairing is kept) and the two-sided p-value of the bootstrap shifted to the null,
  (1 + #{|d*_r - mean(d)| >= |mean(d)|}) / (1 + R).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float
    std: float
    low: float
    high: float
    n: int
    p_value: float | None = None  # of "the mean is zero", where the interval is of a difference


def t_interval(x_s, confidence: float = 0.95) -> Interval:
    """Student-t interval over seeds; with a single seed the bounds are NaN."""
    from scipy import stats

    x_s = np.asarray(x_s, np.float64)
    n, mean = len(x_s), float(np.mean(x_s))
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), float("nan"), n)
    std = float(np.std(x_s, ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / np.sqrt(n)
    return Interval(mean, std, float(mean - half), float(mean + half), n)


def paired_t(a_s, b_s, confidence: float = 0.95) -> Interval:
    """t-interval and p-value of the per-seed differences `a_s - b_s`."""
    from scipy import stats

    d_s = np.asarray(a_s, np.float64) - np.asarray(b_s, np.float64)
    interval = t_interval(d_s, confidence)
    if interval.n < 2:
        return interval
    if interval.std == 0:
        p = 1.0 if interval.mean == 0 else 0.0
    else:
        t = abs(interval.mean) / (interval.std / np.sqrt(interval.n))
        p = float(2 * stats.t.sf(t, interval.n - 1))
    return dataclasses.replace(interval, p_value=p)


def paired_bootstrap(a_sq, b_sq, *, resamples: int = 10_000, seed: int = 0, confidence: float = 0.95) -> Interval:
    """Mean difference over seeds and questions with a paired bootstrap over each seed's questions;
    `a_sq`, `b_sq`: [seeds, questions] (a 1-D array is one seed). `std` is the bootstrap standard error."""
    d_sq = np.atleast_2d(np.asarray(a_sq, np.float64) - np.asarray(b_sq, np.float64))
    seeds, questions = d_sq.shape
    rng = np.random.default_rng(seed)
    means_r = np.empty(resamples)
    for r in range(resamples):
        picks_sq = rng.integers(0, questions, size=(seeds, questions))
        means_r[r] = np.take_along_axis(d_sq, picks_sq, axis=1).mean()
    mean = float(d_sq.mean())
    tail = (1 - confidence) / 2
    low, high = np.quantile(means_r, [tail, 1 - tail])
    p = (1 + np.sum(np.abs(means_r - mean) >= abs(mean))) / (1 + resamples)
    return Interval(mean, float(np.std(means_r, ddof=1)), float(low), float(high), seeds * questions, float(p))
