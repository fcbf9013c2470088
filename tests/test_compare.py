"""Bootstrap intervals of score differences over seeds (tcd_ds/compare.py)."""
from __future__ import annotations

import numpy as np
import pytest

from tcd_ds.compare import bootstrap_diff


def test_difference_of_means_and_degenerate_cases():
    r = bootstrap_diff([80.0, 82.0, 84.0], [70.0, 70.0, 70.0])
    assert r["diff"] == pytest.approx(12.0) and r["n_a"] == 3 and r["n_b"] == 3
    assert 80.0 - 70.0 <= r["ci95"][0] < 12.0 < r["ci95"][1] <= 84.0 - 70.0
    assert bootstrap_diff([75.0], [70.0]) == {"diff": 5.0, "ci95": [5.0, 5.0], "n_a": 1, "n_b": 1}
    assert bootstrap_diff([1.0, 1.0], [1.0, 1.0])["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="at least one score"):
        bootstrap_diff([], [1.0])


def test_interval_is_reproducible_and_sign_symmetric():
    a, b = [81.2, 79.5, 83.0, 80.1, 82.4], [78.0, 80.5, 77.2, 79.9, 78.8]
    assert bootstrap_diff(a, b) == bootstrap_diff(a, b)  # fixed seed
    ab, ba = bootstrap_diff(a, b, seed=3), bootstrap_diff(b, a, seed=3)
    assert ba["diff"] == pytest.approx(-ab["diff"])
    assert ba["ci95"][0] == pytest.approx(-ab["ci95"][1], abs=0.3) and ba["ci95"][1] == pytest.approx(-ab["ci95"][0], abs=0.3)


def test_width_matches_the_normal_approximation():
    """With many seeds the percentile interval approaches diff +- 1.96 * the plug-in standard error."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(80, 2.0, 40), rng.normal(78, 3.0, 40)
    r = bootstrap_diff(a, b, replicates=20_000)
    se = np.sqrt(a.var() / a.size + b.var() / b.size)  # ddof 0: the bootstrap's own plug-in variance
    assert r["ci95"][1] - r["ci95"][0] == pytest.approx(2 * 1.96 * se, rel=0.06)
    assert (r["ci95"][0] + r["ci95"][1]) / 2 == pytest.approx(r["diff"], abs=0.1 * se)


def test_t_quantiles_match_the_table():
    from tcd_ds.compare import t_cdf, t_quantile

    table = {1: 12.7062, 2: 4.3027, 4: 2.7764, 10: 2.2281, 30: 2.0423}  # two-sided 95 %, any textbook
    for df, q in table.items():
        assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)
        assert t_quantile(0.025, df) == pytest.approx(-q, abs=1e-4)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)  # the normal limit
    assert t_cdf(0.0, 3.7) == pytest.approx(0.5) and t_cdf(t_quantile(0.9, 2.5), 2.5) == pytest.approx(0.9)


def test_welch_interval_by_hand_and_degenerate_cases():
    from tcd_ds.compare import t_quantile, welch_diff

    a, b = [70.0, 72.0, 74.0], [68.0, 69.0, 70.0, 71.0, 72.0]
    va, vb = 4.0 / 3, 2.5 / 5  # sample variances over n
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 4)
    half = t_quantile(0.975, df) * (va + vb) ** 0.5
    got = welch_diff(a, b)
    assert got["diff"] == pytest.approx(2.0) and got["df"] == pytest.approx(df)
    assert got["ci95"] == pytest.approx([2.0 - half, 2.0 + half]) and got["method"] == "welch_t"
    assert welch_diff([1.0], [0.0, 2.0])["ci95"] == [0.0, 0.0]  # one seed: no spread, no interval
    assert welch_diff([1.0, 1.0], [0.0, 0.0])["ci95"] == [1.0, 1.0]


def test_welch_covers_95_percent_where_the_bootstrap_covers_less():
    """Simulated normal GLUE scores, 5 fine-tuning seeds a model, unequal spreads: Welch's interval
    holds the true difference about 95 % of the time, the percentile bootstrap markedly less."""
    from tcd_ds.compare import welch_diff

    rng = np.random.default_rng(0)
    sims, hit_w, hit_b = 1000, 0, 0
    for i in range(sims):
        a, b = rng.normal(1.0, 1.0, 5), rng.normal(0.0, 2.0, 5)
        lo, hi = welch_diff(a, b)["ci95"]
        hit_w += lo <= 1.0 <= hi
        if i < 300:
            lo, hi = bootstrap_diff(a, b, replicates=1000, seed=i)["ci95"]
            hit_b += lo <= 1.0 <= hi
    assert 0.93 <= hit_w / sims <= 0.97, hit_w / sims
    assert hit_b / 300 < 0.92, hit_b / 300


def test_t_interval_over_pretraining_seeds():
    from tcd_ds.compare import t_interval

    got = t_interval([1.0, 2.0, 3.0])
    assert got["mean"] == 2.0 and got["df"] == 2
    assert got["ci95"] == pytest.approx([2.0 - 4.302653 / 3 ** 0.5, 2.0 + 4.302653 / 3 ** 0.5], abs=1e-5)
    with pytest.raises(ValueError):
        t_interval([1.0])
