"""The pre-registered replication: the paper's protocol over k independent pre-training seeds.

    python -m tcd_ds.replication [recipe, default small] [--out DIR] [--seeds 1,2] [--report-only]

Each pre-training seed is one run of the experiment pipeline (`python -m tcd_ds.experiments`, its
own teacher, epoch-aligned MoE baseline, TCD student, perf-aligned baseline and their GLUE
fine-tunings) in `<out>/seed-<k>/`, with `pretrain.seed=k` and one `data.eval_seed` for all, so
every model of every seed is scored on the same held-out masked tokens. Seeds run one after the
other; each is resumable (re-run the same command), and `--seeds` runs a subset now.

The primary statistic is fixed in the recipe before any run (`primary`) and computed here only:
per pre-training seed, the mean over fine-tuning seeds of the GLUE average of the student minus
that of the perf-aligned baseline; its mean over the k seeds with a t interval on k - 1 degrees
of freedom (`tcd_ds.compare.t_interval`). Secondary: student - epoch-aligned baseline beside the
two models' val MLM gap (the confound), its slope on that gap across seeds, and student - teacher.
The report states the smallest effect the design could detect (80 % power, two-sided 5 %, the
observed spread of the per-seed differences) and reads each finding off its interval.
`<out>/results.json`: `primary`, `per_seed`, `secondary`, `mde`.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tcd_ds import resources
from tcd_ds.atomic import read_json, write_json_atomic, write_text_atomic
from tcd_ds.cli import fail
from tcd_ds.config import ConfigError, Section

RECIPES = resources.recipes("replication")
ROLES = {"teacher": "teacher", "baseline": "baseline", "tcd": "student", "baseline_aligned": "aligned"}
PRIMARY = ("per pre-training seed, the mean over fine-tuning seeds of GLUE avg (student - perf-aligned "
           "baseline); its mean over pre-training seeds with a t-interval on k - 1 degrees of freedom")


@dataclass
class ReplicationConfig(Section):
    """The replication's recipe (`tcd_ds/recipes/replication/<name>.yaml`)."""

    KEY_NOUN = "recipe key"

    experiment: str = "small"  # the experiment recipe every pre-training seed runs
    overrides: list[str] = field(default_factory=list)  # its key=value overrides (the regime, the eval set)
    pretrain_seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    eval_seed: int = 1  # data.eval_seed of every run of every seed
    steps: list[str] = field(default_factory=lambda: ["teacher", "pretrain", "align", "glue"])
    primary: str = PRIMARY  # the pre-registered statistic, in words (the code computes exactly this)
    out: str = ""

    def validate(self) -> "ReplicationConfig":
        if len(self.pretrain_seeds) < 2 or len(set(self.pretrain_seeds)) != len(self.pretrain_seeds):
            raise ConfigError(f"pretrain_seeds must be >= 2 distinct seeds, got {self.pretrain_seeds}")
        for item in self.overrides:
            key = item.partition("=")[0]
            if "=" not in item or key in ("pretrain.seed", "pretrain.data.eval_seed"):
                raise ConfigError(f"overrides: {item!r} must be key=value and leave pretrain.seed and "
                                  "pretrain.data.eval_seed to the replication")
        if self.primary != PRIMARY:
            raise ConfigError("primary is pre-registered: it must state the statistic this code computes "
                              f"({PRIMARY!r})")
        return self


def load(recipe: str, overrides: list[str] = ()) -> tuple[str, dict]:
    from tcd_ds.experiments import load_section_recipe

    name, rc = load_section_recipe(ReplicationConfig, RECIPES, recipe, overrides, "replication")
    return name, dataclasses.asdict(rc)


def seed_argv(rc: dict, out: Path, seed: int) -> list[str]:
    """The experiment pipeline's arguments for one pre-training seed."""
    return [rc["experiment"], "--out", str(out / f"seed-{seed}"), "--steps", ",".join(rc["steps"]),
            *rc["overrides"], f"pretrain.seed={seed}", f"pretrain.data.eval_seed={rc['eval_seed']}"]


def run_seed(rc: dict, out: Path, seed: int) -> None:
    """One seed's pipeline as a subprocess, its output in `<out>/seed-<k>.log`."""
    from tcd_ds.experiments import ExperimentError

    cmd = [sys.executable, "-m", "tcd_ds.experiments", *seed_argv(rc, out, seed)]
    with open(out / f"seed-{seed}.log", "a") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')}\n$ {' '.join(cmd)}\n")
        log.flush()
        rc_ = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc_ != 0:
        raise ExperimentError(f"pre-training seed {seed} stopped (exit {rc_}); see {out / f'seed-{seed}.log'}; "
                              "re-run to resume")


# --- the statistics ---------------------------------------------------------------------------------

def per_seed(rc: dict, out: Path) -> list[dict[str, Any]]:
    """Every seed whose experiment wrote results.json: its models' val MLM and GLUE avg per fine-tuning seed."""
    found = []
    for seed in rc["pretrain_seeds"]:
        res = read_json(out / f"seed-{seed}" / "results.json")
        if not res:
            continue
        models = {role: {"val_mlm_loss": res["models"][key].get("val_mlm_loss"),
                         "glue_avg": list(res["models"][key].get("glue_avg") or [])}
                  for key, role in ROLES.items() if key in res.get("models", {})}
        found.append({"pretrain_seed": seed, "eval_seed": rc["eval_seed"], "models": models})
    return found


def seed_difference(entry: dict, a: str, b: str) -> float | None:
    """mean over fine-tuning seeds of GLUE avg (a) - (b) for one pre-training seed (None: missing)."""
    ma, mb = entry["models"].get(a), entry["models"].get(b)
    if not ma or not mb or not ma["glue_avg"] or not mb["glue_avg"]:
        return None
    return statistics.mean(ma["glue_avg"]) - statistics.mean(mb["glue_avg"])


def over_seeds(values: list[float], statistic: str) -> dict[str, Any]:
    """{"statistic", "mean", "ci95", "df", "n"} over pre-training seeds (a t interval; none with one)."""
    from tcd_ds.compare import t_interval

    if len(values) < 2:
        return {"statistic": statistic, "mean": values[0] if values else None, "ci95": None, "df": 0,
                "n": len(values)}
    t = t_interval(values)
    return {"statistic": statistic, "mean": t["mean"], "ci95": t["ci95"], "df": t["df"], "n": t["n"]}


def detectable_effect(values: list[float], power: float = 0.8) -> float | None:
    """The smallest true mean difference a two-sided 5 % t test over these k seeds detects with `power`,
    at their observed spread: (t_{0.975, k-1} + t_{power, k-1}) * sd / sqrt(k)."""
    from tcd_ds.compare import t_quantile

    k = len(values)
    if k < 2:
        return None
    return (t_quantile(0.975, k - 1) + t_quantile(power, k - 1)) * statistics.stdev(values) / math.sqrt(k)


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys on xs (None with fewer than 3 points or no spread in xs)."""
    if len(xs) < 3 or len(set(xs)) < 2:
        return None
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def analyze(rc: dict, out: Path) -> dict[str, Any]:
    seeds = per_seed(rc, out)
    for entry in seeds:
        entry["student_minus_aligned"] = seed_difference(entry, "student", "aligned")
    primary_values = [e["student_minus_aligned"] for e in seeds if e["student_minus_aligned"] is not None]
    primary = over_seeds(primary_values, rc["primary"])
    pairs = [(seed_difference(e, "student", "baseline"),
              e["models"]["baseline"]["val_mlm_loss"] - e["models"]["student"]["val_mlm_loss"])
             for e in seeds if "student" in e["models"] and "baseline" in e["models"]
             and seed_difference(e, "student", "baseline") is not None]
    teacher = [d for e in seeds if (d := seed_difference(e, "student", "teacher")) is not None]
    return {
        "primary": {k: primary[k] for k in ("statistic", "mean", "ci95", "df")},
        "per_seed": seeds,
        "secondary": {
            "student_minus_baseline": {**over_seeds([d for d, _ in pairs], "GLUE avg, student - epoch-aligned "
                                                    "baseline"),
                                       "mlm_gap": [g for _, g in pairs],
                                       "slope_per_nat": slope([g for _, g in pairs], [d for d, _ in pairs])},
            "student_minus_teacher": over_seeds(teacher, "GLUE avg, student - teacher"),
        },
        "mde": {"power": 0.8, "points": detectable_effect(primary_values), "k": len(primary_values)},
    }


def reading(stat: dict) -> str:
    """One sentence read off an interval over pre-training seeds."""
    if stat.get("ci95") is None:
        return "not measured yet (fewer than two pre-training seeds)"
    lo, hi = stat["ci95"]
    text = f"{stat['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}] GLUE points over {stat['df'] + 1} pre-training seeds"
    if lo > 0:
        return text + ": the interval is above 0"
    if hi < 0:
        return text + ": the interval is below 0"
    return text + ": the interval contains 0, no evidence either way"


def report(rc: dict, res: dict, command: str) -> str:
    p, sec, mde = res["primary"], res["secondary"], res["mde"]
    lines = ["# Replication over pre-training seeds", "", f"Command: `{command}`", "",
             f"Experiment `{rc['experiment']}` with {', '.join(f'`{o}`' for o in rc['overrides']) or 'no overrides'}; "
             f"pre-training seeds {', '.join(map(str, rc['pretrain_seeds']))}; `data.eval_seed={rc['eval_seed']}` "
             "for every run.", "",
             "## Primary statistic (pre-registered)", "", f"{p['statistic']}.", "",
             f"**Answer:** student - perf-aligned baseline, {reading(p)}.", ""]
    if mde["points"] is not None:
        lines += [f"Smallest effect this design detects (80 % power, two-sided 5 %, k={mde['k']}, the observed "
                  f"spread of the per-seed differences): {mde['points']:.2f} GLUE points.", ""]
    lines += ["## Secondary", "",
              f"- student - epoch-aligned baseline: {reading(sec['student_minus_baseline'])}; the student's val MLM "
              f"advantage per seed (nats): {', '.join(f'{g:+.3f}' for g in sec['student_minus_baseline']['mlm_gap']) or '-'}"
              + (f"; slope {sec['student_minus_baseline']['slope_per_nat']:+.1f} GLUE points per nat"
                 if sec["student_minus_baseline"]["slope_per_nat"] is not None else ""),
              f"- student - teacher: {reading(sec['student_minus_teacher'])}", "",
              "## Per pre-training seed", "", "| seed | role | val MLM | GLUE avg mean | fine-tuning seeds |",
              "|---|---|---|---|---|"]
    for e in res["per_seed"]:
        for role, m in e["models"].items():
            avg = m["glue_avg"]
            lines.append(f"| {e['pretrain_seed']} | {role} | {m['val_mlm_loss']:.3f} | "
                         f"{statistics.mean(avg) if avg else float('nan'):.2f} | {len(avg)} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    from tcd_ds.cli import Parser

    p = Parser(prog="python -m tcd_ds.replication", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", default="small", help="a name in tcd_ds/recipes/replication/ or a YAML path")
    p.add_argument("--out", help="output dir (default: the recipe's out, else runs/replication/<recipe>)")
    p.add_argument("--seeds", help="comma-separated: run these pre-training seeds of the recipe now")
    p.add_argument("--report-only", action="store_true", help="rewrite results.json and report.md")
    p.add_argument("overrides", nargs="*", help="recipe key=value overrides")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from tcd_ds.experiments import ExperimentError

    args = parse_args(argv)
    try:
        name, rc = load(args.recipe, args.overrides)
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else rc["pretrain_seeds"]
        if bad := [s for s in seeds if s not in rc["pretrain_seeds"]]:
            raise ExperimentError(f"--seeds: {bad[0]} is not one of the recipe's pretrain_seeds {rc['pretrain_seeds']}")
    except (ExperimentError, ValueError) as err:
        fail(err)
    out = Path(args.out or rc["out"] or f"runs/replication/{name}")
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m tcd_ds.replication " + " ".join(argv if argv is not None else sys.argv[1:])
    command = command.replace(str(Path.home()), "~")  # the report names no machine's home
    if not args.report_only:
        try:
            for seed in seeds:
                print(f"replication: pre-training seed {seed} -> {out / f'seed-{seed}'}", flush=True)
                run_seed(rc, out, seed)
        except ExperimentError as err:
            fail(err, 1)
    res = analyze(rc, out)
    write_json_atomic(out / "results.json", {**res, "recipe": rc})
    write_text_atomic(out / "report.md", report(rc, res, command))
    print(f"replication: {out / 'report.md'}")
    return res


if __name__ == "__main__":
    main()
