"""The premise study: where does an MoE-BERT beat the vanilla one at pre-training (P1)?

    python -m tcd_ds.premise [recipe, default small] [--out DIR] [--report-only] [key=value ...]

TCD starts from "MoE wins at pre-training but transfers worse". This pre-trains the vanilla model and
MoE variants (`variants`: name -> trainer overrides, e.g. fewer experts, `moe_every`, capacity) with
the same data, steps and schedule for every seed in `seeds`, and compares their held-out val MLM loss
at equal steps. Every run evaluates the same masked tokens (`data.eval_seed`, independent of the
run's seed), so the loss of two seeds compares.

P1 (decided before the runs, as the issue states it): an MoE variant wins at pre-training when
`mean(reference) - mean(variant)` of the val MLM loss at the last common eval step is larger than
the spread between pre-training seeds, taken as the larger of the two models' seed ranges
(max - min); with one seed a model has no measured spread and no verdict is given.

Every run is a unit of `tcd_ds.experiments.Pipeline` (resumable: re-run the same command and
finished runs are skipped, an unfinished one resumes from its latest checkpoint). `<out>/results.json`
and `<out>/report.md` are rewritten from the runs' `metrics.jsonl` at the end, and with
`--report-only` at any time (runs still training enter with the evals they have).
"""
from __future__ import annotations

import dataclasses
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tcd_ds.atomic import read_json, read_jsonl, write_json_atomic, write_text_atomic
from tcd_ds.config import ConfigError, Section, apply_overrides, build_config, from_dict

RECIPES = Path(__file__).parent / "recipes" / "premise"


@dataclass
class PremiseConfig(Section):
    """The premise study's recipe (`tcd_ds/recipes/premise/<name>.yaml`)."""

    KEY_NOUN = "recipe key"

    model_recipe: str = "small"
    ranks: int = 1
    threads: int = 1  # OMP_NUM_THREADS of each run
    jobs: int = 2  # runs side by side
    ds_config: str = "auto"
    out: str = ""  # default runs/premise/<recipe name>
    pretrain: dict[str, Any] = field(default_factory=dict)  # trainer keys of every run
    variants: dict[str, Any] = field(default_factory=dict)  # name -> trainer keys on top of pretrain
    reference: str = "vanilla"  # the variant every other one is compared with
    seeds: list[int] = field(default_factory=lambda: [1, 2])

    def validate(self) -> "PremiseConfig":
        if self.ranks < 1 or self.jobs < 1 or self.threads < 0:
            raise ConfigError("ranks and jobs must be >= 1, threads >= 0")
        if self.reference not in self.variants:
            raise ConfigError(f"reference {self.reference!r} is not one of the variants ({', '.join(self.variants)})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of distinct seeds, got {self.seeds}")
        for name, keys in self.variants.items():
            if not isinstance(keys, dict):
                raise ConfigError(f"variants.{name} must be a mapping of trainer keys, got {keys!r}")
        return self


def load(recipe: str, overrides: list[str] = ()) -> tuple[str, dict]:
    from tcd_ds.experiments import ExperimentError

    path = Path(recipe) if Path(recipe).is_file() else RECIPES / f"{recipe}.yaml"
    if not path.is_file():
        raise ExperimentError(f"premise recipe {recipe!r} is neither a file nor {RECIPES / (recipe + '.yaml')}")
    try:
        rc = apply_overrides(from_dict(PremiseConfig, yaml.safe_load(path.read_text()) or {}), list(overrides))
    except (ConfigError, yaml.YAMLError) as err:
        raise ExperimentError(str(err).splitlines()[0]) from None
    rc = dataclasses.asdict(rc)
    for name in rc["variants"]:  # every run's trainer config builds (a typo fails here, not hours later)
        try:
            _, (mode, extra) = _runs_of(rc, name, rc["seeds"][0])
            build_config(rc["model_recipe"], [f"mode={mode}", *extra])
        except ConfigError as err:
            raise ExperimentError(f"variants.{name}: {err}") from None
    return path.stem, rc


def _runs_of(rc: dict, variant: str, seed: int) -> tuple[str, tuple[str, list[str]]]:
    """(run name, (mode, the trainer overrides on top of pretrain)) of one variant and seed."""
    from tcd_ds.experiments import _trainer_overrides

    keys = _trainer_overrides(rc["variants"][variant])
    experts = build_config(rc["model_recipe"], ["mode=vanilla", *_trainer_overrides(rc["pretrain"]),
                                                *keys]).model.moe.num_experts
    mode = "moe" if experts else "vanilla"
    return f"{variant}-seed{seed}", (mode, [*_trainer_overrides(rc["pretrain"]), *keys, f"seed={seed}"])


def plan(rc: dict) -> list[tuple[str, str, int, str, list[str]]]:
    """(run, variant, seed, mode, overrides) in the order they start: variant by variant, so the
    reference and the first variant have all their seeds first."""
    order = [rc["reference"], *(v for v in rc["variants"] if v != rc["reference"])]
    out = []
    for variant in order:
        for seed in rc["seeds"]:
            run, (mode, extra) = _runs_of(rc, variant, seed)
            out.append((run, variant, seed, mode, extra))
    return out


# --- the runs ---------------------------------------------------------------------------------------

def train_all(rc: dict, out: Path, name: str) -> None:
    from tcd_ds.experiments import Pipeline, _stop

    prc = {**rc, "teacher": {}, "pretrain": {}}  # the overrides travel whole in each run's `extra`
    p = Pipeline(name, prc, out)
    p.step = "runs"
    runs = plan(rc)
    p.say(f"premise study -> {out}: {len(runs)} runs, {rc['jobs']} at a time, {rc['threads']} thread(s) each")
    with ThreadPoolExecutor(rc["jobs"]) as pool:
        futures = [pool.submit(p.train, out / "runs" / run, mode, extra, log=f"{run}.log")
                   for run, _, _, mode, extra in runs]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            for proc in list(p.training):
                _stop(proc)
            raise


# --- the analysis -----------------------------------------------------------------------------------

def _val_curve(run_dir: Path) -> dict[int, float]:
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "eval" and "val" in r]
    return {int(r["step"]): float(r["val"]["mlm_loss"]) for r in rows}


def _spread(values: list[float]) -> float | None:
    return max(values) - min(values) if len(values) > 1 else None


def analyze(rc: dict, out: Path) -> dict:
    """results.json's content: each run's val curve and final point, and per variant its seeds'
    val MLM at the last step every run of it and of the reference reached, against the reference."""
    runs = {}
    for run, variant, seed, mode, extra in plan(rc):
        run_dir = out / "runs" / run
        cfg = build_config(rc["model_recipe"], [f"mode={mode}", *extra])
        curve = _val_curve(run_dir)
        summary = read_json(run_dir / "summary.json") or {}
        runs[run] = {"variant": variant, "seed": seed, "num_experts": cfg.model.moe.num_experts,
                     "moe_every": cfg.model.moe.moe_every, "capacity_factor": cfg.model.moe.capacity_factor,
                     "max_steps": cfg.train.max_steps, "tokens_per_step": cfg.train.micro_batch_size *
                     cfg.train.grad_accum * rc["ranks"] * cfg.data.max_seq_len, "eval_seed": cfg.data.eval_seed,
                     "finished": bool(summary) and not summary.get("interrupted"),
                     "step_time_s": summary.get("step_time_s"), "val_curve": sorted(curve.items())}
    ref = rc["reference"]
    variants = {}
    for variant in rc["variants"]:
        mine = [r for r in runs.values() if r["variant"] == variant]
        theirs = [r for r in runs.values() if r["variant"] == ref]
        common = set.intersection(*(set(dict(r["val_curve"])) for r in mine + theirs)) if mine + theirs else set()
        entry = {"num_experts": mine[0]["num_experts"], "seeds": [r["seed"] for r in mine], "step": None}
        if common:
            step = max(common)
            vals = [dict(r["val_curve"])[step] for r in mine]
            ref_vals = [dict(r["val_curve"])[step] for r in theirs]
            spread = [s for s in (_spread(vals), _spread(ref_vals)) if s is not None]
            gap = statistics.mean(ref_vals) - statistics.mean(vals)
            entry.update(step=step, tokens=step * mine[0]["tokens_per_step"], val_mlm=vals,
                         mean=statistics.mean(vals), seed_range=_spread(vals),
                         gap_to_reference=gap if variant != ref else None)
            if variant != ref:
                measured = len(vals) > 1 and len(ref_vals) > 1
                entry["p1"] = {"gap": gap, "spread": max(spread) if measured else None,
                               "met": (gap > max(spread)) if measured else None}
        variants[variant] = entry
    return {"reference": ref, "p1_rule": "mean(reference) - mean(variant) of val MLM at the last common eval step "
            "> the larger of the two models' seed ranges (max - min over pre-training seeds)",
            "eval_seed": next(iter(runs.values()))["eval_seed"] if runs else None,
            "variants": variants, "runs": runs}


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def report(rc: dict, results: dict, command: str) -> str:
    ref = results["reference"]
    lines = ["# Premise study: does MoE win at pre-training here?", "",
             f"Command: `{command}`", "",
             f"P1 rule (fixed before the runs): {results['p1_rule']}. Val MLM on the same masked tokens in "
             f"every run (`data.eval_seed={results['eval_seed']}`).", "",
             f"| variant | experts | seeds | step | tokens | val MLM per seed | mean | seed range | "
             f"{ref} - variant | P1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        p1 = v.get("p1") or {}
        verdict = ("-" if name == ref or not v["step"] else "no verdict (one seed)" if p1.get("met") is None
                   else "**met**" if p1["met"] else "not met")
        lines.append(f"| {name} | {v['num_experts']} | {len(v['seeds'])} | {v['step'] or '-'} | "
                     f"{_f(v.get('tokens'), ',')} | {', '.join(_f(x) for x in v.get('val_mlm', []))} | "
                     f"{_f(v.get('mean'))} | {_f(v.get('seed_range'))} | {_f(v.get('gap_to_reference'), '+.3f')} | "
                     f"{verdict} |")
    lines += ["", "## Runs", "", "| run | experts | moe_every | capacity | finished | s/step | val MLM by step |",
              "|---|---|---|---|---|---|---|"]
    for run, r in results["runs"].items():
        curve = " ".join(f"{s}:{v:.3f}" for s, v in r["val_curve"])
        lines.append(f"| {run} | {r['num_experts']} | {r['moe_every']} | {r['capacity_factor']:g} | "
                     f"{'yes' if r['finished'] else 'no'} | {_f(r['step_time_s'], '.2f')} | {curve or '-'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    from tcd_ds.cli import Parser

    p = Parser(prog="python -m tcd_ds.premise", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", default="small", help="premise recipe: a name in tcd_ds/recipes/premise/ "
                   "or a YAML path")
    p.add_argument("--out", help="output dir (default: the recipe's out, else runs/experiments/<recipe>)")
    p.add_argument("--report-only", action="store_true", help="rewrite results.json and report.md from the runs")
    p.add_argument("overrides", nargs="*", help="recipe key=value overrides, e.g. seeds=1,2,3")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from tcd_ds.experiments import ExperimentError, Stopped, _stop_on_signals, resolve_ds_config

    args = parse_args(argv)
    try:
        name, rc = load(args.recipe, args.overrides)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args.out or rc["out"] or f"runs/premise/{name}")
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m tcd_ds.premise " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.report_only:
        rc["ds_config"], _ = resolve_ds_config(rc["ds_config"], out)
        previous = _stop_on_signals()  # SIGTERM / SIGHUP stop the trainers (each saves) before exiting
        try:
            train_all(rc, out, name)
        except ExperimentError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        except (Stopped, KeyboardInterrupt) as err:
            sig = signal.Signals(err.signum if isinstance(err, Stopped) else signal.SIGINT)
            print(f"error: stopped by {sig.name}: the trainers saved their checkpoints; re-run the same command to "
                  "resume", file=sys.stderr)
            raise SystemExit(128 + sig.value) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    results = analyze(rc, out)
    write_json_atomic(out / "results.json", {**results, "recipe": rc, "written": time.strftime("%Y-%m-%d %H:%M:%S")})
    write_text_atomic(out / "report.md", report(rc, results, command))
    print(f"premise study: {out / 'report.md'}")
    return results


if __name__ == "__main__":
    main()
