"""`report.md` of an experiment (`python -m tcd_ds.experiments`): paper-style tables and PNG plots,
read back from the experiment's out dir. Cells of fine-tuning results are `median (mean ± std)`
over seeds, in percent, at the best lr of each sweep (highest median score; sample std, ddof=1).
"""
from __future__ import annotations

import importlib.metadata
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tcd_ds.atomic import read_json, read_jsonl, write_json_atomic
from tcd_ds.cli import format_duration
from tcd_ds.experiment_layout import (STEPS, aligned_dir, glue_models, random_init_dir, run_dirs, trend_from_glue,
                                     trend_steps)

COLORS = {"teacher": "tab:blue", "baseline": "tab:orange", "baseline_long": "tab:red", "tcd": "tab:green"}
LABELS = {"teacher": "Teacher (vanilla BERT)", "baseline": "MoE baseline (epoch-aligned)",
          "baseline_aligned": "MoE baseline (perf-aligned)", "baseline_long": "MoE baseline (long run)",
          "tcd": "TCD student (MoE)", "random_init": "Random init (no pre-training, teacher's architecture)"}
# (a, b) pairs of results.json's comparisons: a - b per task and for the GLUE average
COMPARISONS = (("tcd", "baseline"), ("tcd", "baseline_aligned"), ("tcd", "teacher"), ("teacher", "random_init"),
               ("baseline", "random_init"), ("tcd", "random_init"))
MODES = {"teacher": "vanilla", "random_init": "random", "tcd": "tcd"}  # default: moe
HEADINGS = ("## Setup", "## Wall time per step", "## Pre-training", "## Alignment", "## GLUE",
            "## Ablations", "## Trend over pre-training", "## Out-of-distribution MLM loss",
            "## Relations to the teacher", "## Comparisons", "## Findings")
PLOTS = ("mlm_curves.png", "trend.png", "ablations.png", "ood.png")


# --- pure helpers -------------------------------------------------------------------------------

def stats(values) -> dict[str, float]:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {"median": float("nan"), "mean": float("nan"), "std": float("nan"), "n": 0}
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"median": float(np.median(arr)), "mean": float(arr.mean()), "std": std, "n": int(arr.size)}


def fmt_stats(values, scale: float = 100.0, digits: int = 1) -> str:
    """`median (mean ± std)` of `values * scale`; an en dash when there are none."""
    s = stats(values)
    if not s["n"]:
        return "–"
    return (f"{s['median'] * scale:.{digits}f} ({s['mean'] * scale:.{digits}f} ± "
            f"{s['std'] * scale:.{digits}f})")


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def interpolate(points: list[tuple[float, float]], x0: float) -> float | None:
    """y at x == x0 along a trajectory of (x, y) points (in training order): linear, on the first
    segment whose ends straddle x0; None if the trajectory never crosses x0."""
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        if min(xa, xb) <= x0 <= max(xa, xb):
            return ya if xa == xb else ya + (yb - ya) * (x0 - xa) / (xb - xa)
    return None


def per_seed_average(results: dict[str, dict], tasks=None) -> list[float]:
    """The GLUE average of each seed over the given tasks' results.json (best lr of each task); []
    when `tasks` is given and `results` lacks one of them (an average over fewer tasks is another
    quantity: a model whose fine-tuning is unfinished has none)."""
    from tcd_ds.data.glue import glue_average

    if not results or tasks is not None and not set(tasks) <= set(results):
        return []
    per_task = {t: r["glue_score"]["per_seed"] for t, r in results.items()}
    n = min(len(v) for v in per_task.values())
    return [glue_average({t: v[i] for t, v in per_task.items()}) for i in range(n)]


def scores(result: dict | None) -> list[float]:
    return result["glue_score"]["per_seed"] if result else []


# --- reading the out dir ------------------------------------------------------------------------

def trend_scores(out: Path, rc: dict, variant: str, step: int) -> list[float]:
    """The trend's per-seed scores at `step`: its own fine-tuning, or (`trend_from_glue`) step
    glue's scores of the trend's seeds."""
    if not trend_from_glue(rc, step):
        return scores(read_json(out / "trend" / variant / f"step_{step:08d}" / "results.json"))
    res = read_json(out / "glue" / variant / rc["trend"]["task"] / "results.json")
    if not res:
        return []
    by_seed = dict(zip(res["seeds"], res["glue_score"]["per_seed"]))
    return [by_seed[x] for x in rc["trend"]["seeds"] or rc["glue"]["seeds"] if x in by_seed]


def _tokens_at(history: list[dict], step: int) -> int | None:
    """Tokens seen by `step`, from a run's logged training history (the last entry at or before it)."""
    seen = [h for h in history or [] if h.get("step", 0) <= step and "tokens" in h]
    return int(seen[-1]["tokens"]) if seen else None


def _where() -> str:
    """The working directory the command ran from, as the report names it: relative data paths are
    read from there (no machine's absolute path: the repo root by name, else under ~)."""
    from tcd_ds.resources import ROOT

    cwd = Path(os.getcwd()).resolve()
    return "the repo root" if cwd == ROOT.resolve() else "`" + str(cwd).replace(str(Path.home()), "~") + "`"


def export_num_experts(config: dict) -> int:
    """The experts per MoE layer of an export's config.json: our exports keep the MoE settings under
    `tcd_moe` (a dense BERT has none: 0)."""
    return int((config.get("tcd_moe") or {}).get("num_experts", config.get("num_experts", 0)) or 0)


def _pretraining(out: Path, rc: dict, key: str, runs: dict[str, dict]) -> dict[str, Any]:
    """steps, tokens and the held-out MLM figures of one model of results.json."""
    if key == "random_init":
        done = read_json(random_init_dir(out) / "done.json") or {}
        ev, steps, tokens = done.get("eval") or {}, 0, 0
    elif key == "baseline_aligned":
        al = read_json(aligned_dir(out) / "done.json")
        long = runs.get(al.get("source", "baseline_long")) if al else None
        if not al or not long:
            return {}
        ev = next((e for e in long.get("eval_history", []) if e["step"] == al["step"]), {})
        steps, tokens = al["step"], _tokens_at(long.get("history"), al["step"])
    else:
        s = runs.get(key)
        if not s:
            return {}
        ev, steps, tokens = s.get("eval") or {}, s["steps"], s.get("tokens")
    export = (random_init_dir(out) / "export") if key == "random_init" else (
        aligned_dir(out) / "export" if key == "baseline_aligned" else run_dirs(out, rc)[key] / "export")
    config = read_json(export / "config.json") or {}
    return {"hidden_size": config.get("hidden_size"), "num_experts": export_num_experts(config),
            "steps": steps, "tokens": tokens,
            "val_mlm_loss": ev.get("val", {}).get("mlm_loss"), "val_mlm_accuracy": ev.get("val", {}).get("accuracy"),
            "wikitext2_mlm_loss": ev.get("wikitext2", {}).get("mlm_loss"),
            "gutenberg_mlm_loss": ev.get("gutenberg", {}).get("mlm_loss")}


def analysis_results(out: Path) -> dict[str, dict[str, dict]]:
    """model -> eval corpus -> the `analyze` result (its per-tap figures and means) of step analyze."""
    found: dict[str, dict[str, dict]] = {}
    for done in sorted((Path(out) / "analyze").glob("*/*/done.json")):
        if (d := read_json(done)) and "mean" in d:
            found.setdefault(done.parent.parent.name, {})[done.parent.name] = d
    return found


def results(out: Path, rc: dict, command: str) -> dict[str, Any]:
    """What `results.json` holds: per model its pre-training figures and per GLUE task its per-seed
    scores (percent, at the sweep's best lr), and the comparisons with 95 % Welch t intervals."""
    from tcd_ds.compare import welch_diff

    out = Path(out)
    runs = {k: s for k, d in run_dirs(out, rc).items() if (s := read_json(d / "summary.json"))}
    skipped = read_json(out / "glue" / "skipped.json") or {}
    tasks = [t for t in rc["glue"]["tasks"] if t not in skipped]
    models: dict[str, Any] = {}
    for key in glue_models(out, rc):
        res = {t: r for t in tasks if (r := read_json(out / "glue" / key / t / "results.json"))}
        models[key] = {"mode": MODES.get(key, "moe"), **_pretraining(out, rc, key, runs),
                       "glue": {t: [100.0 * x for x in scores(r)] for t, r in res.items()},
                       "best_lr": {t: r["best_lr"] for t, r in res.items()},
                       "glue_avg": [100.0 * x for x in per_seed_average(res, tasks)]}
    comparisons = []
    for a, b in COMPARISONS:
        if a not in models or b not in models:
            continue
        for task in [*tasks, "GLUE avg"]:
            xa = models[a]["glue_avg"] if task == "GLUE avg" else models[a]["glue"].get(task, [])
            xb = models[b]["glue_avg"] if task == "GLUE avg" else models[b]["glue"].get(task, [])
            if xa and xb:
                comparisons.append({"a": a, "b": b, "task": task, **welch_diff(xa, xb)})
    return {"command": command, "tasks": tasks, "seeds": rc["glue"]["seeds"], "lrs": rc["glue"]["lrs"],
            "scores": "percent: the task's GLUE score (mean of its metrics), per seed, at the best lr (highest median)",
            "models": models, "comparisons": comparisons,
            "analysis": {m: {c: r["mean"] for c, r in per.items()} for m, per in analysis_results(out).items()},
            "skipped_tasks": skipped}

def _machine() -> dict[str, Any]:
    import torch

    try:
        ds = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        ds = "not installed"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return {"cpus (os.cpu_count)": os.cpu_count(), "cpus usable": len(os.sched_getaffinity(0)),
            "cpu model": cpu, "torch": torch.__version__,
            "deepspeed": ds, "python": platform.python_version(), "platform": platform.platform()}


# --- plots --------------------------------------------------------------------------------------

def _figure(path: Path, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend(ax, size: int) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size)
    else:
        ax.text(0.5, 0.5, "no data (step not run)", ha="center", va="center", transform=ax.transAxes)


def _plot_curves(runs: dict[str, dict], path: Path) -> None:
    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, s in runs.items():
            style = "--" if name == "baseline_long" else "-"
            h = [(r["step"], r["mlm"]) for r in s.get("history", []) if "mlm" in r]
            e = [(r["step"], r["val"]["mlm_loss"]) for r in s.get("eval_history", []) if "val" in r]
            if h:
                axes[0].plot(*zip(*h), style, color=COLORS.get(name), label=LABELS.get(name, name))
            if e:
                axes[1].plot(*zip(*e), style + "o", ms=3, color=COLORS.get(name), label=LABELS.get(name, name))
        for ax, title in zip(axes, ("train MLM loss (history)", "held-out val MLM loss (eval_history)")):
            ax.set(title=title, xlabel="pre-training step", ylabel="MLM loss")
            _legend(ax, 8)
        return fig
    _figure(path, draw)


def _plot_trend(trend: dict[str, dict[int, list[float]]], task: str, path: Path) -> None:
    def draw(plt):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, points in trend.items():
            steps = sorted(s for s in points if points[s])
            if steps:
                st = [stats(points[s]) for s in steps]
                ax.errorbar(steps, [100 * x["median"] for x in st], yerr=[100 * x["std"] for x in st],
                            marker="o", capsize=3, color=COLORS.get(name), label=LABELS.get(name, name))
        ax.set(title=f"{task} after fine-tuning vs pre-training step (median ± std)",
               xlabel="pre-training step", ylabel=f"{task} score (%)")
        _legend(ax, 8)
        return fig
    _figure(path, draw)


def _plot_ablations(rows: list[tuple[str, list[float], float | None]], tasks: str, path: Path) -> None:
    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        names = [r[0] for r in rows]
        st = [stats(r[1]) for r in rows]
        med = [100 * s["median"] if s["n"] else 0 for s in st]
        axes[0].bar(names, med, yerr=[100 * s["std"] if s["n"] else 0 for s in st], capsize=3, color="tab:blue")
        if any(s["n"] for s in st):
            low = min(100 * (s["median"] - s["std"]) for s in st if s["n"])
            axes[0].set_ylim(max(0.0, low - 5), max(100 * (s["median"] + s["std"]) for s in st if s["n"]) + 3)
        axes[0].set(title=f"{tasks} after fine-tuning (median ± std over seeds)", ylabel="score (%)")
        axes[1].bar(names, [r[2] if r[2] is not None else 0 for r in rows], color="tab:orange")
        vals = [r[2] for r in rows if r[2] is not None]
        if vals:
            axes[1].set_ylim(min(vals) - 0.05 * (max(vals) - min(vals) + 1), max(vals) + 0.05)
        axes[1].set(title="final val MLM loss", ylabel="MLM loss")
        for ax in axes:
            ax.tick_params(axis="x", rotation=45)
        return fig
    _figure(path, draw)


def _plot_ood(runs: dict[str, dict], marks: dict[str, tuple[float, float]], path: Path) -> None:
    def draw(plt):
        fig, ax = plt.subplots(figsize=(6.5, 4.8))
        near = max((x for x, _ in marks.values()), default=float("inf")) + 0.3  # zoom on the compared points
        for name in ("baseline_long", "baseline", "tcd"):
            e = [(r["val"]["mlm_loss"], r["gutenberg"]["mlm_loss"]) for r in runs.get(name, {}).get(
                "eval_history", []) if "gutenberg" in r and "val" in r and r["val"]["mlm_loss"] <= near]
            if e:
                ax.plot(*zip(*e), "o-", ms=3, alpha=0.7, color=COLORS[name], label=LABELS[name] + " (over training)")
        for name, (x, y) in marks.items():
            ax.plot([x], [y], "*", ms=15, mec="black", color=COLORS.get(name, "tab:red" if "baseline" in name
                                                                         else None),
                    label=f"{LABELS.get(name, name)}: compared point")
        ax.set(title="OOD (Gutenberg) vs in-domain (val) MLM loss\n(each point: one evaluation during training)",
               xlabel="val MLM loss (in-domain)", ylabel="Gutenberg MLM loss (OOD)")
        ax.invert_xaxis()
        _legend(ax, 7)
        return fig
    _figure(path, draw)


# --- the report ---------------------------------------------------------------------------------

@dataclass
class _Report:
    """What the sections of one report share: the out dir, the recipe, the command, the runs'
    summaries, and what earlier sections found for later ones."""
    out: Path
    rc: dict
    command: str
    runs: dict
    inv: list = field(default_factory=list)  # invocations.jsonl
    al: dict | None = None  # the alignment's done.json
    glue: dict = field(default_factory=dict)  # {model: {task: results.json}}
    tasks: list = field(default_factory=list)  # the GLUE tasks fine-tuned (not skipped)
    trend: dict = field(default_factory=dict)  # {variant: {step: per-seed scores}}
    comparisons: list = field(default_factory=list)  # results.json's, with their intervals
    findings: list = field(default_factory=list)


def write_report(out: Path, name: str, rc: dict, command: str) -> Path:
    """`<out>/report.md` (with `plots/` and `results.json`): the sections in order, each a function."""
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    runs = {k: s for k, d in run_dirs(out, rc).items() if (s := read_json(d / "summary.json"))}
    c = _Report(out, rc, command, runs)
    md = [f"# TCD experiment `{name}`", "",
          "Reproduction of the protocol of *Transfer Capability Distillation* (arXiv 2403.01994) at this "
          "recipe's scale. Numbers are reported as measured; fine-tuning cells are **median (mean ± std)** "
          "over seeds in percent, at each sweep's best lr (highest median).", ""]
    for section in (_setup_section, _wall_time_section, _pretraining_section, _alignment_section, _glue_section,
                    _ablations_section, _trend_section, _ood_section, _relations_section, _comparisons_section,
                    _findings_section):
        md += section(c)
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, path)
    return path


def _setup_section(c: _Report) -> list[str]:
    """The command, the invocations of the out dir, the machine and the resolved recipe."""
    out, rc, command = c.out, c.rc, c.command
    md: list[str] = []
    md += [HEADINGS[0], "", f"Command (run from {_where()}):", "", "```bash", command, "```", ""]
    inv = read_jsonl(out / "invocations.jsonl")
    if len(inv) > 1:
        md += ["Invocations of this out dir (resumes skip finished units):", "",
               md_table(["started", "command", "wall", "units run"],
                        [[i["started"], f"`{i['command']}`", format_duration(i["wall_s"]), len(i["ran"])]
                         for i in inv]), ""]
    md += ["Machine:", "", md_table(["key", "value"], [[k, v] for k, v in _machine().items()] + [
        ["threads per process (OMP_NUM_THREADS)", rc["threads"] or "default"], ["pre-training ranks", rc["ranks"]],
        ["fine-tuning jobs at a time", rc["jobs"]]]), "",
           "Resolved recipe (recipe file + command-line overrides):", "", "```yaml",
           yaml.safe_dump({k: v for k, v in rc.items() if not k.startswith("_")}, sort_keys=False).strip(),
           "```", ""]
    c.inv = inv
    return md


def _wall_time_section(c: _Report) -> list[str]:
    """Each step's wall time and its units' time."""
    out, rc, inv = c.out, c.rc, c.inv
    md: list[str] = []
    walls: dict[str, float] = {}
    for i in inv:  # wall time of the invocations that ran units of the step or were stopped in it
        for step, wall in i.get("steps", {}).items():
            if any(u.split("/")[0] == step for u in i.get("ran", [])) or i.get("stopped_in") == step:
                walls[step] = walls.get(step, 0.0) + wall
    rows = []
    for i, step in enumerate(STEPS, 1):
        d = read_json(out / step / "done.json")
        rows.append([f"{i}. {step}", d["units"] if d else "not run",
                     format_duration(walls[step]) if step in walls else "–",
                     format_duration(d["seconds"]) if d else "–"])
    rows.append(["total", "", format_duration(sum(walls.values())), ""])
    md += [HEADINGS[1], "", "Wall time = the time the step took in the invocation(s) that ran its units or were "
           "stopped in it; unit time = "
           f"the sum of its units' own times (fine-tunings run {rc['jobs']} at a time, so theirs overlap).", "",
           md_table(["step", "units", "wall time", "unit time"], rows), ""]
    return md


def _pretraining_section(c: _Report) -> list[str]:
    """Every pre-training run's final figures, and the MLM curves plot."""
    out, rc, runs = c.out, c.rc, c.runs
    md: list[str] = []
    rows = []
    for key, s in runs.items():
        ev = s.get("eval") or {}
        rows.append([LABELS.get(key, f"TCD ablation {key[4:]}"), s["mode"], s["steps"],
                     fmt((s.get("history") or [{}])[-1].get("mlm")), fmt(ev.get("val", {}).get("mlm_loss")),
                     fmt(ev.get("val", {}).get("accuracy")), fmt(ev.get("wikitext2", {}).get("mlm_loss")),
                     fmt(ev.get("gutenberg", {}).get("mlm_loss")), fmt(s.get("step_time_s"), 2),
                     f"{s.get('parameters', 0) / 1e6:.2f}M / {s.get('active_parameters', 0) / 1e6:.2f}M"])
    md += [HEADINGS[2], "", f"Model recipe `{rc['model_recipe']}`, {rc['ranks']} rank(s). Final evaluation "
           "(held-out Wikipedia split = val, WikiText-2 test, Gutenberg novels = out of distribution).", "",
           md_table(["run", "mode", "steps", "train MLM", "val MLM", "val acc", "WikiText-2 MLM", "Gutenberg MLM",
                     "s/step", "params (total / active)"], rows), "",
           "![MLM loss curves](plots/mlm_curves.png)", ""]
    _plot_curves({k: runs[k] for k in ("teacher", "baseline", "tcd", "baseline_long") if k in runs},
                 out / "plots" / PLOTS[0])
    return md


def _alignment_section(c: _Report) -> list[str]:
    """The performance-aligned baseline: which checkpoint, against which target."""
    out, rc = c.out, c.rc
    md: list[str] = []
    al = read_json(aligned_dir(out) / "done.json")
    md += [HEADINGS[3], ""]
    if al:
        rows = [[LABELS["tcd"], al["student_steps"], fmt(al["target"]), "target"],
                [LABELS["baseline"], al["baseline_steps"], fmt(al["baseline_val"]), "same steps as the student"]]
        if al.get("long_steps"):
            md += [f"Pre-training-performance alignment: the epoch-aligned baseline does not reach the student's "
                   f"val MLM loss, so a baseline is scheduled {rc['align']['factor']:g}× longer ({al['long_steps']} "
                   f"steps, eval + checkpoint every {rc['align']['every']}) and trained until its first eval at or "
                   "below the student's final val MLM loss; that checkpoint is taken.", ""]
            ran = al.get("long_ran") or al["long_steps"]
            rows.append([LABELS["baseline_long"], ran, fmt(al["long_val"]),
                         "stopped at the target" if ran < al["long_steps"] else "end of the long run"])
        else:
            md += ["Pre-training-performance alignment: the epoch-aligned baseline already reaches the student's "
                   "val MLM loss, so the earliest of its own checkpoints (eval + checkpoint every "
                   f"{math.gcd(rc['align']['every'], rc['trend']['every'])} steps) whose val MLM loss <= the "
                   "student's final val MLM loss is taken; no longer run is needed.", ""]
        rows.append([LABELS["baseline_aligned"], al["step"], fmt(al["mlm_loss"]),
                     "reached the target" if al["reached"] else "**did not reach the target**: last checkpoint"])
        md += [md_table(["model", "steps", "val MLM loss", "note"], rows), ""]
    else:
        md += ["(not run)", ""]
    c.al = al
    return md


def _glue_section(c: _Report) -> list[str]:
    """The GLUE table: per model and task the median (mean ± std) over seeds."""
    out, rc, al = c.out, c.rc, c.al
    g = rc["glue"]
    md: list[str] = []
    skipped = read_json(out / "glue" / "skipped.json") or {}
    tasks = [t for t in g["tasks"] if t not in skipped]
    glue = {v: {t: r for t in tasks if (r := read_json(out / "glue" / v / t / "results.json"))}
            for v in glue_models(out, rc)}
    rows = []
    for v, res in glue.items():
        label = LABELS[v] + (f", step {al['step']}" if v == "baseline_aligned" and al else "")
        rows.append([label] + [fmt_stats(scores(res.get(t))) for t in tasks] + [fmt_stats(per_seed_average(res, tasks))])
    md += [HEADINGS[4], "", f"Tasks {', '.join(tasks)}; lrs {', '.join(f'{x:g}' for x in g['lrs'])}; seeds "
           f"{', '.join(map(str, g['seeds']))}; {g['epochs']} epoch(s); train examples "
           f"{g['max_train_examples'] or 'all'}, eval examples {g['max_eval_examples'] or 'all'} (dev split). "
           "Task score = mean of its metrics (MRPC: F1 and accuracy; CoLA: MCC); GLUE avg = per-seed mean over the "
           f"tasks{' (WNLI included)' if 'WNLI' in tasks else ''}, then median (mean ± std) over seeds (only for "
           "a model with every task).", ""]
    if g.get("per_task"):
        md += ["Per-task settings (instead of the above): " + "; ".join(
            f"{t}: " + ", ".join(f"{k} {', '.join(f'{x:g}' for x in v) if isinstance(v, list) else v}"
                                 for k, v in st.items()) for t, st in g["per_task"].items()) + ".", ""]
    md += [md_table(["model"] + tasks + ["GLUE avg"], rows), ""]
    for t, why in skipped.items():
        md += [f"- {t} skipped: {why}"]
    best = [f"{LABELS[v]}: " + ", ".join(f"{t} {r['best_lr']:g}" for t, r in res.items())
            for v, res in glue.items() if res]
    md += ([""] if skipped else []) + ["Best lr per task: " + "; ".join(best) + ".", ""]
    c.glue, c.tasks = glue, tasks
    return md


def _ablations_section(c: _Report) -> list[str]:
    """TCD with subsets of the alignment positions."""
    out, rc, runs, glue = c.out, c.rc, c.runs, c.glue
    abl = rc["ablations"]
    md: list[str] = []
    full = [("none (MoE baseline)", "baseline", None)] + \
        [(p, f"tcd_{p}", out / "ablations" / p) for p in abl["positions"]] + [("TIA (full TCD)", "tcd", None)]
    rows, bars = [], []
    for label, key, adir in full:
        res = {t: (read_json(adir / t / "results.json") if adir else glue.get(key, {}).get(t)) for t in abl["tasks"]}
        res = {t: r for t, r in res.items() if r}
        ev = (runs.get(key) or {}).get("eval") or {}
        val = ev.get("val", {}).get("mlm_loss")
        rows.append([label, fmt(val), fmt(ev.get("gutenberg", {}).get("mlm_loss"))]
                    + [fmt_stats(scores(res.get(t))) for t in abl["tasks"]]
                    + ([fmt_stats(per_seed_average(res, abl["tasks"]))] if len(abl["tasks"]) > 1 else []))
        bars.append((label.split(" ")[0], per_seed_average(res, abl["tasks"]), val))
    md += [HEADINGS[5], "", f"TCD with a subset of the alignment positions, {rc['_steps']} steps each (as the "
           "student), fine-tuned with the GLUE settings.", "",
           md_table(["positions", "val MLM", "Gutenberg MLM"] + abl["tasks"]
                    + (["avg"] if len(abl["tasks"]) > 1 else []), rows), "", "![ablations](plots/ablations.png)", ""]
    _plot_ablations(bars, " + ".join(abl["tasks"]), out / "plots" / PLOTS[2])
    return md


def _trend_section(c: _Report) -> list[str]:
    """The trend task fine-tuned from checkpoints along pre-training."""
    out, rc = c.out, c.rc
    g, tr = rc["glue"], rc["trend"]
    md: list[str] = []
    trend = {v: {s: trend_scores(out, rc, v, s) for s in trend_steps(rc)} for v in ("baseline", "tcd")}
    md += [HEADINGS[6], "", f"{tr['task']} fine-tuned from checkpoints saved along pre-training (lrs "
           f"{', '.join(f'{x:g}' for x in tr['lrs'] or g['lrs'])}, seeds {', '.join(map(str, tr['seeds'] or g['seeds']))})."
           , "", md_table(["step", LABELS["baseline"], LABELS["tcd"]],
                          [[s, fmt_stats(trend["baseline"][s]), fmt_stats(trend["tcd"][s])] for s in trend_steps(rc)]),
           "", "![trend](plots/trend.png)", ""]
    _plot_trend(trend, tr["task"], out / "plots" / PLOTS[1])
    c.trend = trend
    return md


def _ood_section(c: _Report) -> list[str]:
    """In-domain vs Gutenberg MLM loss at matched in-domain loss (opens the findings)."""
    out, runs = c.out, c.runs
    md: list[str] = []
    ood = read_json(out / "ood" / "analysis" / "done.json")
    md += [HEADINGS[7], ""]
    marks, findings = {}, []
    if ood:
        rows = []
        for key in ("teacher", "baseline", "baseline_aligned", "tcd"):
            m = ood["models"].get(key, {})
            val, gut = m.get("val", {}).get("mlm_loss"), m.get("gutenberg", {}).get("mlm_loss")
            rows.append([LABELS[key], m.get("step", "–"), fmt(val), fmt(m.get("wikitext2", {}).get("mlm_loss")),
                         fmt(gut), fmt(gut - val if gut is not None and val is not None else None)])
            if key in ("baseline_aligned", "tcd") and gut is not None:
                marks[key] = (val, gut)
        interp = ood.get("baseline_gutenberg_at_student_val")
        tcd_m, bal = ood["models"]["tcd"], ood["models"]["baseline_aligned"]
        md += ["Models aligned on in-domain MLM loss: the perf-aligned baseline checkpoint vs the TCD student. "
               "The paper's claim: at equal in-domain loss the TCD student has the lower OOD loss.", "",
               md_table(["model", "step", "val MLM", "WikiText-2 MLM", "Gutenberg MLM (OOD)", "OOD − val"], rows), "",
               f"Baseline's Gutenberg loss linearly interpolated along its long run at the student's val loss "
               f"({fmt(tcd_m['val']['mlm_loss'])}): {fmt(interp)}.", "", "![ood](plots/ood.png)", ""]
        if "gutenberg" in tcd_m and "gutenberg" in bal:
            ref = interp if interp is not None else bal["gutenberg"]["mlm_loss"]
            d = tcd_m["gutenberg"]["mlm_loss"] - ref
            gap = [m["gutenberg"]["mlm_loss"] - m["val"]["mlm_loss"] for m in (tcd_m, bal)]
            direction = "the direction the paper reports" if d < 0 else "against the paper's direction"
            findings.append(
                f"OOD: at matched in-domain loss the TCD student's Gutenberg MLM loss is {'lower' if d < 0 else 'higher'}"
                f" than the baseline's ({fmt(tcd_m['gutenberg']['mlm_loss'])} vs {fmt(ref)}"
                f"{' interpolated' if interp is not None else ''}; OOD − val gap {gap[0]:.3f} vs {gap[1]:.3f} for the "
                f"perf-aligned checkpoint): {direction}"
                f"{', but only by ' + f'{abs(d):.3f} nats, too small to count as a reproduction' if abs(d) < 0.02 else ''}.")
    else:
        md += ["(not run)", ""]
    _plot_ood(runs, marks, out / "plots" / PLOTS[3])
    c.findings = findings
    return md


def _relations_section(c: _Report) -> list[str]:
    """`analyze`'s relation losses and CKA to the teacher, per model and per layer."""
    out, glue, tasks = c.out, c.glue, c.tasks
    md: list[str] = []
    analysis = analysis_results(out)
    md += [HEADINGS[8], ""]
    if analysis:
        corpora = sorted({c for per in analysis.values() for c in per})
        head, rows = ["model", "GLUE avg"], []
        for c in corpora:
            head += [f"{c} L_T", f"{c} L_I", f"{c} L_A", f"{c} CKA T", f"{c} CKA I"]
        for key, per in analysis.items():
            row = [LABELS.get(key, f"TCD ablation {key[4:]}"), fmt_stats(per_seed_average(glue.get(key, {}), tasks))
                   if key in glue else "–"]
            for c in corpora:
                m = per.get(c, {}).get("mean", {})
                row += [fmt(m.get(x, {}).get("relation"), 4) for x in "TIA"] + \
                    [fmt(m.get(x, {}).get("cka"), 3) for x in "TI"]
            rows.append(row)
        md += ["`python -m tcd_ds.analyze` on held-out text: the relation loss to the teacher (the trainer's "
               "MSE form, mean over layers and taps of a position; lower = closer) and linear CKA between the "
               "model's and the teacher's representations (T, I; higher = closer). Does TCD bring the student's "
               "relations closer to the teacher's, and do the closer models transfer better (GLUE avg beside)?",
               "", md_table(head, rows), ""]
        if "baseline" in analysis and "tcd" in analysis:
            c = corpora[0]
            per_b, per_t = analysis["baseline"].get(c, {}).get("per_tap", {}), analysis["tcd"].get(c, {}).get("per_tap", {})
            taps = [k for k in per_t if k.startswith(("T/", "I/"))]
            md += [f"Per layer on {c} (baseline → student):", "", md_table(
                ["tap", "relation baseline", "relation student", "CKA baseline", "CKA student"],
                [[k, fmt(per_b.get(k, {}).get("relation"), 4), fmt(per_t[k]["relation"], 4),
                  fmt(per_b.get(k, {}).get("cka"), 3), fmt(per_t[k].get("cka"), 3)] for k in taps]), ""]
    else:
        md += ["(not run)", ""]
    return md


def _comparisons_section(c: _Report) -> list[str]:
    """The comparisons with Welch t intervals; writes results.json."""
    out, rc, command = c.out, c.rc, c.command
    md: list[str] = []
    res_json = results(out, rc, command)
    rows = [[f"{LABELS[c['a']]} − {LABELS[c['b']]}", c["task"], f"{c['diff']:+.1f}",
             f"[{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]", f"{c['n_a']} / {c['n_b']}"]
            for c in res_json["comparisons"]]
    md += [HEADINGS[9], "", "Difference of mean scores (points), with a 95 % Welch t interval over the "
           "fine-tuning seeds (unequal variances; `tcd_ds/compare.py`: with 5 seeds a side a percentile "
           "bootstrap covers only ~88 %). The interval leaves out pre-training's variance: one pre-training "
           "of each model. An interval that contains 0 is no evidence either way.", "",
           md_table(["a − b", "task", "diff", "95 % CI", "seeds a / b"], rows) if rows else "(nothing to compare yet)",
           ""]
    write_json_atomic(out / "results.json", res_json)
    c.comparisons = res_json["comparisons"]
    return md


def _findings_section(c: _Report) -> list[str]:
    """The findings in words: the TCD student's GLUE-average comparisons, each read off its interval;
    alignment, trend (and the OOD finding)."""
    rc, al, trend, findings = c.rc, c.al, c.trend, c.findings
    tr = rc["trend"]
    glue = [f"GLUE avg, {LABELS[x['a']]} − {LABELS[x['b']]}: {x['diff']:+.1f} [{x['ci95'][0]:+.1f}, "
            f"{x['ci95'][1]:+.1f}] points: "
            + ("the interval excludes 0." if x["ci95"][0] > 0 or x["ci95"][1] < 0
               else "the interval contains 0, no evidence either way.")
            for x in c.comparisons if x["a"] == "tcd" and x["task"] == "GLUE avg"]
    findings[:0] = glue
    if al:
        findings.append(f"Alignment: the baseline {'reached' if al['reached'] else 'did not reach'} the student's "
                        f"val MLM loss {fmt(al['target'])} (step {al['step']}, loss {fmt(al['mlm_loss'])}); the "
                        f"epoch-aligned baseline ended at {fmt(al['baseline_val'])}.")
    last = trend_steps(rc)[-1]
    if trend.get("baseline", {}).get(last) and trend.get("tcd", {}).get(last):
        d = 100 * (stats(trend["tcd"][last])["median"] - stats(trend["baseline"][last])["median"])
        findings.append(f"Trend: at step {last}, TCD {'−+'[d >= 0]}{abs(d):.1f} points on {tr['task']} vs the "
                        "baseline (see the table for the earlier checkpoints).")
    md = [HEADINGS[10], "", *[f"- {f}" for f in findings or ["(nothing to compare yet)"]]]
    if glue:
        md += ["", "The intervals resample fine-tuning seeds only: each model was pre-trained once, so the "
               "variance of pre-training is not in them (another `pretrain.seed=N`, in another out dir, "
               "measures it)."]
    return md
