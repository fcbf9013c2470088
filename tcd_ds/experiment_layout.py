"""Where an experiment (`python -m tcd_ds.experiments`) keeps its runs: the step names and the
directory of every run and unit under `<out>/`. The pipeline (`experiments.py`) writes there and the
report (`report.py`) reads there; both take the layout from here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

STEPS = ("teacher", "pretrain", "align", "ablations", "trend", "ood", "analyze", "glue")


def run_dirs(out: Path, rc: dict) -> dict[str, Path]:
    """The run directory of every pre-training run (teacher, baselines, student, ablations)."""
    d = {"teacher": out / "teacher" / "run", "baseline": out / "pretrain" / "baseline",
         "tcd": out / "pretrain" / "tcd", "baseline_long": out / "align" / "baseline_long"}
    d.update({f"tcd_{p}": out / "ablations" / p / "run" for p in rc["ablations"]["positions"]})
    return d


def aligned_dir(out: Path) -> Path:
    """The unit of step align: the performance-aligned baseline's `done.json` and `export/`."""
    return out / "align" / "aligned"


def random_init_dir(out: Path) -> Path:
    """The random-init row of step glue: its `done.json` (held-out MLM figures) and `export/`."""
    return out / "glue" / "random_init"


def glue_models(out: Path, rc: dict) -> dict[str, Path]:
    """The exported models step glue fine-tunes, by row name."""
    dirs = run_dirs(out, rc)
    models = {"teacher": dirs["teacher"] / "export", "baseline": dirs["baseline"] / "export"}
    if rc["glue"]["include_aligned"]:
        models["baseline_aligned"] = aligned_dir(out) / "export"
    models["tcd"] = dirs["tcd"] / "export"
    if rc["glue"]["include_random"]:
        models["random_init"] = random_init_dir(out) / "export"
    return models


def analyzed_models(out: Path, rc: dict) -> dict[str, Path]:
    """The MoE models compared with the teacher by `analyze` (those whose export exists)."""
    dirs = run_dirs(out, rc)
    models = {"baseline": dirs["baseline"] / "export", "baseline_aligned": aligned_dir(out) / "export",
              "tcd": dirs["tcd"] / "export"}
    models.update({f"tcd_{p}": dirs[f"tcd_{p}"] / "export" for p in rc["ablations"]["positions"]})
    return {k: v for k, v in models.items() if (v / "config.json").is_file()}


def task_settings(rc: dict, task: str) -> dict[str, Any]:
    """lrs, epochs and batch size of `task`'s fine-tuning: glue.per_task's, else glue's."""
    g = rc["glue"]
    return {"lrs": g["lrs"], "epochs": g["epochs"], "batch_size": g["batch_size"], **g["per_task"].get(task, {})}


def trend_from_glue(rc: dict, step: int) -> bool:
    """Whether the trend point at `step` is step glue's own fine-tuning: the final step (its checkpoint
    holds the weights of the run's export) when the trend's task is one of glue's, its lrs are glue's
    for that task and its seeds are among glue's. Step trend then does not fine-tune it again; the
    report takes glue's scores of the trend's seeds."""
    t, g = rc["trend"], rc["glue"]
    if step != rc["_steps"] or t["task"] not in g["tasks"]:
        return False
    lrs = task_settings(rc, t["task"])["lrs"]
    return (t["lrs"] or lrs) == lrs and set(t["seeds"] or g["seeds"]) <= set(g["seeds"])


def trend_steps(rc: dict) -> list[int]:
    """The pre-training steps step trend fine-tunes from (every `trend.every`, and the last)."""
    every, steps = rc["trend"]["every"], rc["_steps"]
    return sorted(set(range(every, steps + 1, every)) | {steps})
