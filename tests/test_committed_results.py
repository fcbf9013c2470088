"""The committed results of the `small` experiment hold what users and checks read, and hang
together: the full run (`docs/results/small/`) and its replicate with another pre-training seed
(`docs/results/small-seed2/`: teacher, baseline and student only). every comparison's difference is the difference of the two models' per-seed
means (recomputed here with plain arithmetic, not through the report's code), inside its interval,
and the report shows each plot it names."""
from __future__ import annotations

import json
import re
from pathlib import Path
from statistics import mean

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results"
# dir: (the models' modes, the comparisons it must hold)
RUNS = {"small": (["moe", "moe", "random", "tcd", "vanilla"], {("tcd", "teacher"), ("tcd", "baseline"),
                                                               ("tcd", "baseline_aligned")}),
        "small-seed2": (["moe", "tcd", "vanilla"], {("tcd", "teacher"), ("tcd", "baseline")})}


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request) -> tuple[Path, dict]:
    return DOCS / request.param, json.loads((DOCS / request.param / "results.json").read_text())


def test_results_json_has_the_documented_keys(run):
    path, results = run
    assert results["command"].startswith("python -m tcd_ds.experiments small")
    modes = {name: m["mode"] for name, m in results["models"].items()}
    assert sorted(modes.values()) == RUNS[path.name][0], modes
    for name, m in results["models"].items():
        assert m["hidden_size"] == 128, name
        assert isinstance(m["tokens"], int) and m["tokens"] >= 0, name
        for key in ("val_mlm_accuracy", "val_mlm_loss", "gutenberg_mlm_loss"):
            assert isinstance(m[key], float), (name, key)
        assert set(m["glue"]) == set(results["tasks"]) and all(len(v) >= 5 for v in m["glue"].values()), name
        assert all(-100 <= x <= 100 for v in m["glue"].values() for x in v), name  # percent


def test_each_comparison_is_the_difference_of_per_seed_means_inside_its_interval(run):
    path, results = run
    models, tasks = results["models"], results["tasks"]

    def per_seed(name: str, task: str) -> list[float]:
        glue = models[name]["glue"]
        if task != "GLUE avg":
            return glue[task]
        return [mean(glue[t][i] for t in tasks) for i in range(min(len(glue[t]) for t in tasks))]

    pairs = {(c["a"], c["b"]) for c in results["comparisons"]}
    assert RUNS[path.name][1] <= pairs
    for c in results["comparisons"]:
        a, b = per_seed(c["a"], c["task"]), per_seed(c["b"], c["task"])
        assert c["diff"] == pytest.approx(mean(a) - mean(b), abs=1e-6), c
        lo, hi = c["ci95"]
        assert lo <= c["diff"] <= hi, c
    assert {c["task"] for c in results["comparisons"]} == {*tasks, "GLUE avg"}


def test_the_report_shows_its_plots_and_the_command(run):
    path, results = run
    text = (path / "report.md").read_text()
    plots = re.findall(r"\]\((plots/[^)]+\.png)\)", text)
    assert plots and all((path / p).is_file() for p in plots), plots
    assert results["command"] in text
