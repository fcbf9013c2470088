"""The committed results of the `small` experiment (`docs/results/small/`) hold what users and checks
read, and hang together: every comparison's difference is the difference of the two models' per-seed
means (recomputed here with plain arithmetic, not through the report's code), inside its interval,
and the report shows each plot it names."""
from __future__ import annotations

import json
import re
from pathlib import Path
from statistics import mean

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "small"


@pytest.fixture(scope="module")
def results() -> dict:
    return json.loads((RESULTS / "results.json").read_text())


def test_results_json_has_the_documented_keys(results):
    assert results["command"].startswith("python -m tcd_ds.experiments small")
    modes = {name: m["mode"] for name, m in results["models"].items()}
    assert sorted(modes.values()) == ["moe", "moe", "random", "tcd", "vanilla"], modes
    for name, m in results["models"].items():
        assert m["hidden_size"] == 128, name
        assert isinstance(m["tokens"], int) and m["tokens"] >= 0, name
        for key in ("val_mlm_accuracy", "val_mlm_loss", "gutenberg_mlm_loss"):
            assert isinstance(m[key], float), (name, key)
        assert set(m["glue"]) == set(results["tasks"]) and all(len(v) >= 5 for v in m["glue"].values()), name
        assert all(-100 <= x <= 100 for v in m["glue"].values() for x in v), name  # percent


def test_each_comparison_is_the_difference_of_per_seed_means_inside_its_interval(results):
    models, tasks = results["models"], results["tasks"]

    def per_seed(name: str, task: str) -> list[float]:
        glue = models[name]["glue"]
        if task != "GLUE avg":
            return glue[task]
        return [mean(glue[t][i] for t in tasks) for i in range(min(len(glue[t]) for t in tasks))]

    pairs = {(c["a"], c["b"]) for c in results["comparisons"]}
    tcd = next(n for n, m in models.items() if m["mode"] == "tcd")
    teacher = next(n for n, m in models.items() if m["mode"] == "vanilla")
    assert {(tcd, teacher), (tcd, "baseline"), (tcd, "baseline_aligned")} <= pairs
    for c in results["comparisons"]:
        a, b = per_seed(c["a"], c["task"]), per_seed(c["b"], c["task"])
        assert c["diff"] == pytest.approx(mean(a) - mean(b), abs=1e-6), c
        lo, hi = c["ci95"]
        assert lo <= c["diff"] <= hi, c
    assert {c["task"] for c in results["comparisons"]} == {*tasks, "GLUE avg"}


def test_the_report_shows_its_plots_and_the_command(results):
    text = (RESULTS / "report.md").read_text()
    plots = re.findall(r"\]\((plots/[^)]+\.png)\)", text)
    assert plots and all((RESULTS / p).is_file() for p in plots), plots
    assert results["command"] in text
