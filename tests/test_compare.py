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
