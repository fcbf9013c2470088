"""Comparisons between two models' fine-tuning scores over seeds, with Welch t or bootstrap intervals.

`welch_diff` (what the reports use where both sides have >= 2 seeds): mean(a) - mean(b) with a
Welch t interval (unequal variances, Welch-Satterthwaite degrees of freedom). With the few seeds a
CPU budget affords (3-5 a model) the percentile bootstrap below is too narrow: simulated on normal
scores with 5 seeds a side it covers the true difference ~88 % of the time, Welch's ~95 %
(tests/test_compare.py measures both). `t_quantile` is Student's t without scipy.

A comparison is the difference of mean scores, `mean(a) - mean(b)`, with a 95 % percentile
bootstrap interval: each replicate resamples `a`'s seeds and `b`'s seeds independently, with
replacement (the models were fine-tuned with the same seeds, but a seed does not pair two runs in
any useful sense: different models, different trajectories). The GLUE average is compared the same
way over the per-seed averages. With one seed per side the interval is the single difference (no
spread can be measured), and the `n` fields say so.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

REPLICATES = 10_000


def bootstrap_diff(a: Sequence[float], b: Sequence[float], replicates: int = REPLICATES, seed: int = 0,
                   level: float = 0.95) -> dict[str, float | list[float] | int]:
    """`{"diff", "ci95": [lo, hi], "n_a", "n_b"}` for mean(a) - mean(b)."""
    xa, xb = np.asarray(list(a), dtype=np.float64), np.asarray(list(b), dtype=np.float64)
    if xa.size == 0 or xb.size == 0:
        raise ValueError("bootstrap_diff needs at least one score on each side")
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, xa.size, size=(replicates, xa.size))
    ib = rng.integers(0, xb.size, size=(replicates, xb.size))
    reps = xa[ia].mean(axis=1) - xb[ib].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [tail, 1.0 - tail])
    return {"diff": float(xa.mean() - xb.mean()), "ci95": [float(lo), float(hi)], "n_a": int(xa.size),
            "n_b": int(xb.size)}


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (> 0, not necessarily whole) degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The `p` quantile of Student's t (bisection on `t_cdf`, to 1e-10)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-10 * max(1.0, hi):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2.0


def welch_diff(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float | list[float] | int]:
    """`{"diff", "ci95": [lo, hi], "n_a", "n_b", "df", "method"}` for mean(a) - mean(b) with a Welch t
    interval; both sides need >= 2 scores (with one, no spread is measured: the interval is the
    single difference and df is 0). Two sides without any spread give a zero-width interval."""
    xa, xb = np.asarray(list(a), dtype=np.float64), np.asarray(list(b), dtype=np.float64)
    if xa.size == 0 or xb.size == 0:
        raise ValueError("welch_diff needs at least one score on each side")
    diff = float(xa.mean() - xb.mean())
    out = {"diff": diff, "n_a": int(xa.size), "n_b": int(xb.size), "method": "welch_t"}
    if xa.size < 2 or xb.size < 2:
        return {**out, "ci95": [diff, diff], "df": 0.0}
    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    se = math.sqrt(va + vb)
    if se == 0.0:
        return {**out, "ci95": [diff, diff], "df": float(xa.size + xb.size - 2)}
    df = (va + vb) ** 2 / (va ** 2 / (xa.size - 1) + vb ** 2 / (xb.size - 1))
    half = t_quantile(1.0 - (1.0 - level) / 2.0, df) * se
    return {**out, "ci95": [diff - half, diff + half], "df": float(df)}


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, float | list[float] | int]:
    """`{"mean", "ci95", "n", "df"}`: the mean of `values` with a t interval on n - 1 degrees of freedom
    (the replication's primary statistic over pre-training seeds); n >= 2."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size < 2:
        raise ValueError("t_interval needs at least two values")
    half = t_quantile(1.0 - (1.0 - level) / 2.0, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return {"mean": float(x.mean()), "ci95": [float(x.mean() - half), float(x.mean() + half)], "n": int(x.size),
            "df": int(x.size - 1)}
