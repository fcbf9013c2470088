"""Comparisons between two models' fine-tuning scores over seeds, with bootstrap intervals.

A comparison is the difference of mean scores, `mean(a) - mean(b)`, with a 95 % percentile
bootstrap interval: each replicate resamples `a`'s seeds and `b`'s seeds independently, with
replacement (the models were fine-tuned with the same seeds, but a seed does not pair two runs in
any useful sense: different models, different trajectories). The GLUE average is compared the same
way over the per-seed averages. With one seed per side the interval is the single difference (no
spread can be measured), and the `n` fields say so.
"""
from __future__ import annotations

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
