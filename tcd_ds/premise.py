"""The premise study: where does an MoE-BERT beat the vanilla one at pre-training (P1)?

    python -m tcd_ds.premise [recipe, default small] [--out DIR] [--steps pretrain,transfer]
                             [--variants a,b] [--report-only] [key=value ...]

TCD starts from "MoE wins at pre-training but transfers worse". This pre-trains the vanilla model and
MoE variants (`variants`: name -> trainer overrides, e.g. fewer experts, `moe_every`, capacity) with
the same data, steps and schedule for every seed in `seeds`, and compares their held-out val MLM loss
at equal steps. Every run evaluates the same masked tokens (`data.eval_seed`, independent of the
run's seed), so the loss of two seeds compares.

P1 (decided before the runs, as the issue states it): an MoE variant wins at pre-training when
`mean(reference) - mean(variant)` of the val MLM loss at the last common eval step is larger than
the spread between pre-training seeds, taken as the larger of the two models' seed ranges
(max - min); with one seed a model has no measured spread and no verdict is given.

P2 (step `transfer`): for each variant in `transfer` (`best`: the one with the largest P1 gap) and
each seed, the two models are taken at about the same val MLM loss: the one behind at its end (its
export), the one ahead at its earliest saved checkpoint at or below that loss (exported to
`<out>/transfer/<run>-step<N>/export`); both are fine-tuned on `glue` (tasks x lrs x seeds, the
best lr per task by the dev median, as in the experiments). P2 holds for a variant when the
reference's GLUE average minus the variant's is > 0 with a 95 % Welch interval over fine-tuning
seeds (pooled over pre-training seeds) that excludes 0; the per-pre-training-seed differences are
reported beside it.

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

from tcd_ds import resources
from tcd_ds.atomic import read_json, read_jsonl, write_json_atomic, write_text_atomic
from tcd_ds.cli import fail
from tcd_ds.config import ConfigError, Section, build_config
from tcd_ds.experiment_config import GlueConfig

STEPS = ("pretrain", "transfer")

RECIPES = resources.recipes("premise")


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
    transfer: list[str] = field(default_factory=lambda: ["best"])  # P2's variants; best: the largest P1 gap
    glue: GlueConfig = field(default_factory=lambda: GlueConfig(tasks=["CoLA", "SST-2", "MRPC"]))

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
        for name in self.transfer:
            if name != "best" and (name not in self.variants or name == self.reference):
                raise ConfigError(f"transfer names {name!r}: give variants other than the reference, or best")
        self.glue.validate()
        return self


def load(recipe: str, overrides: list[str] = ()) -> tuple[str, dict]:
    from tcd_ds.experiments import ExperimentError, load_section_recipe

    stem, rc = load_section_recipe(PremiseConfig, RECIPES, recipe, overrides, "premise")
    rc = dataclasses.asdict(rc)
    rc["glue"]["per_task"] = {task: {k: v for k, v in entry.items() if v is not None}
                              for task, entry in rc["glue"]["per_task"].items()}
    for name in rc["variants"]:  # every run's trainer config builds (a typo fails here, not hours later)
        try:
            _, (mode, extra) = _runs_of(rc, name, rc["seeds"][0])
            build_config(rc["model_recipe"], [f"mode={mode}", *extra])
        except ConfigError as err:
            raise ExperimentError(f"variants.{name}: {err}") from None
    return stem, rc


def _runs_of(rc: dict, variant: str, seed: int) -> tuple[str, tuple[str, list[str]]]:
    """(run name, (mode, the trainer overrides on top of pretrain)) of one variant and seed."""
    from tcd_ds.experiments import _trainer_overrides

    keys = _trainer_overrides(rc["variants"][variant])
    experts = build_config(rc["model_recipe"], ["mode=vanilla", *_trainer_overrides(rc["pretrain"]),
                                                *keys]).model.moe.num_experts
    mode = "moe" if experts else "vanilla"
    return f"{variant}-seed{seed}", (mode, [*_trainer_overrides(rc["pretrain"]), *keys, f"seed={seed}"])


def plan(rc: dict, only: list[str] | None = None) -> list[tuple[str, str, int, str, list[str]]]:
    """(run, variant, seed, mode, overrides) in the order they start: variant by variant, so the
    reference and the first variant have all their seeds first; `only`: these variants (and the
    reference) alone."""
    order = [rc["reference"], *(v for v in rc["variants"] if v != rc["reference"] and (only is None or v in only))]
    out = []
    for variant in order:
        for seed in rc["seeds"]:
            run, (mode, extra) = _runs_of(rc, variant, seed)
            out.append((run, variant, seed, mode, extra))
    return out


# --- the runs ---------------------------------------------------------------------------------------

def pipeline(rc: dict, out: Path, name: str):
    from tcd_ds.experiments import Pipeline

    return Pipeline(name, {**rc, "teacher": {}, "pretrain": {}}, out)  # overrides travel whole in each run's `extra`


def train_all(p, rc: dict, out: Path, only: list[str] | None = None) -> None:
    from tcd_ds.experiments import _stop

    p.step = "runs"
    runs = plan(rc, only)
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


# --- P2: transfer at matched loss ----------------------------------------------------------------

def transfer_variants(rc: dict, results: dict) -> list[str]:
    """The variants of step transfer: `best` is the variant with the largest P1 gap (none yet: [])."""
    out = []
    for name in rc["transfer"]:
        if name == "best":
            gaps = {v: e["gap_to_reference"] for v, e in results["variants"].items()
                    if v != rc["reference"] and e.get("gap_to_reference") is not None}
            name = max(gaps, key=gaps.get) if gaps else None
        if name and name not in out:
            out.append(name)
    return out


def matched_pair(out: Path, rc: dict, variant: str, seed: int) -> dict[str, dict]:
    """{run: {"export" or "checkpoint", "step", "val"}} of `variant` and the reference at `seed`, at
    about the same val MLM loss: the run behind at its end, the run ahead at its earliest saved
    checkpoint at or below the behind one's final loss."""
    from tcd_ds.checkpoint import complete_checkpoints
    from tcd_ds.experiments import ExperimentError, select_aligned

    runs = {f"{v}-seed{seed}": out / "runs" / f"{v}-seed{seed}" for v in (rc["reference"], variant)}
    final = {}
    for run, d in runs.items():
        summary = read_json(d / "summary.json")
        if not summary or summary.get("interrupted") or "eval" not in summary:
            raise ExperimentError(f"step transfer needs the finished run {d}: run step pretrain first")
        final[run] = (summary["steps"], summary["eval"]["val"]["mlm_loss"], summary["eval_history"])
    behind = max(final, key=lambda r: final[r][1])
    ahead = next(r for r in final if r != behind)
    saved = [s for _, s in complete_checkpoints(runs[ahead] / "checkpoints")]
    sel = select_aligned(final[ahead][2], saved, final[behind][1])
    return {behind: {"source": "export", "step": final[behind][0], "val": final[behind][1]},
            ahead: {"source": "checkpoint", "step": sel["step"], "val": sel["mlm_loss"], "reached": sel["reached"]}}


def _model_dir(out: Path, run: str, pick: dict) -> Path:
    if pick["source"] == "export":
        return out / "runs" / run / "export"
    return out / "transfer" / f"{run}-step{pick['step']}" / "export"


def transfer(p, rc: dict, out: Path, results: dict) -> None:
    """Export the matched checkpoints and fine-tune both models of every pair on `glue`."""
    import shutil

    from tcd_ds.checkpoint import export_checkpoint

    for variant in transfer_variants(rc, results):
        for seed in rc["seeds"]:
            for run, pick in matched_pair(out, rc, variant, seed).items():
                model = _model_dir(out, run, pick)
                if pick["source"] == "checkpoint":
                    def work(run=run, pick=pick, model=model) -> dict:
                        export_checkpoint(out / "runs" / run / "checkpoints" / f"step_{pick['step']:08d}", model)
                        shutil.copyfile(out / "runs" / run / "export" / "vocab.txt", model / "vocab.txt")
                        return pick
                    p.unit(model.parent, pick, work)
                for task in rc["glue"]["tasks"]:
                    p.finetune(model, task, out / "transfer" / "glue" / model.parent.name / task)
    p.drain()


def transfer_results(rc: dict, out: Path, results: dict) -> dict:
    """P2's figures: per variant and seed the matched models, their GLUE averages per fine-tuning
    seed, and the reference - variant difference with its Welch interval."""
    from tcd_ds.compare import welch_diff
    from tcd_ds.report import per_seed_average

    tasks, ref, found = rc["glue"]["tasks"], rc["reference"], {}
    for variant in transfer_variants(rc, results):
        pairs, pooled = [], {ref: [], variant: []}
        for seed in rc["seeds"]:
            try:
                pair = matched_pair(out, rc, variant, seed)
            except Exception:  # a run still training: no pair yet
                continue
            entry = {"seed": seed, "models": {}}
            for run, pick in pair.items():
                name = _model_dir(out, run, pick).parent.name
                res = {t: r for t in tasks if (r := read_json(out / "transfer" / "glue" / name / t / "results.json"))}
                avg = [100.0 * x for x in per_seed_average(res, tasks)]
                entry["models"][run.rsplit("-seed", 1)[0]] = {**pick, "run": run, "glue_avg": avg}
            both = [entry["models"][v]["glue_avg"] for v in (ref, variant)]
            if all(both):
                entry["ref_minus_variant"] = welch_diff(*both)
                pooled[ref] += both[0]
                pooled[variant] += both[1]
            pairs.append(entry)
        summary = {"pairs": pairs}
        if pooled[ref] and pooled[variant]:
            d = welch_diff(pooled[ref], pooled[variant])
            summary["ref_minus_variant"] = d
            summary["p2_met"] = None if not d["df"] else d["ci95"][0] > 0  # one score a side: not measured
        found[variant] = summary
    return found


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
            final = all(r["finished"] and step == r["max_steps"] for r in mine + theirs)
            entry.update(step=step, final=final, tokens=step * mine[0]["tokens_per_step"], val_mlm=vals,
                         mean=statistics.mean(vals), seed_range=_spread(vals), reference_mean=statistics.mean(ref_vals),
                         reference_seed_range=_spread(ref_vals),
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
             f"| variant | experts | seeds | step | tokens | val MLM per seed | mean | seed range | {ref} mean (range) "
             f"at that step | {ref} - variant | P1 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        p1 = v.get("p1") or {}
        verdict = ("-" if name == ref or not v["step"] else "no verdict (one seed)" if p1.get("met") is None
                   else "**met**" if p1["met"] else "not met")
        if verdict not in ("-",) and not v.get("final"):
            verdict += " (so far: runs still training)"
        lines.append(f"| {name} | {v['num_experts']} | {len(v['seeds'])} | {v['step'] or '-'} | "
                     f"{_f(v.get('tokens'), ',')} | {', '.join(_f(x) for x in v.get('val_mlm', []))} | "
                     f"{_f(v.get('mean'))} | {_f(v.get('seed_range'))} | "
                     f"{_f(v.get('reference_mean'))} ({_f(v.get('reference_seed_range'))}) | "
                     f"{_f(v.get('gap_to_reference'), '+.3f')} | "
                     f"{verdict} |")
    lines += ["", "## P2: transfer at matched val MLM loss", ""]
    if not results.get("transfer"):
        lines.append("Not measured yet: step transfer runs once the pre-trainings are done "
                     f"(`--steps transfer`; variants: {', '.join(rc['transfer'])}).")
    for variant, t in (results.get("transfer") or {}).items():
        if not t["pairs"]:
            lines += [f"`{ref}` against `{variant}`: not measured yet (the pre-trainings of the pair are not finished).", ""]
            continue
        lines += [f"`{ref}` against `{variant}`, GLUE average ({', '.join(rc['glue']['tasks'])}; dev, best lr per "
                  "task by the median) per fine-tuning seed:", "",
                  "| seed | model | taken at | val MLM | GLUE avg per ft seed | mean |", "|---|---|---|---|---|---|"]
        for pair in t["pairs"]:
            for role, m in pair["models"].items():
                at = "end" if m["source"] == "export" else f"checkpoint, step {m['step']}"
                avg = m["glue_avg"]
                lines.append(f"| {pair['seed']} | {role} | {at} | {m['val']:.3f} | "
                             f"{', '.join(f'{x:.1f}' for x in avg) or '-'} | "
                             f"{_f(statistics.mean(avg) if avg else None, '.2f')} |")
        lines.append("")
        for pair in t["pairs"]:
            if "ref_minus_variant" in pair:
                d = pair["ref_minus_variant"]
                lines.append(f"- seed {pair['seed']}: {ref} - {variant} {d['diff']:+.2f} "
                             f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] points (Welch, {d['n_a']} / {d['n_b']})")
        if "ref_minus_variant" in t:
            d = t["ref_minus_variant"]
            verdict = {True: "**P2 met**: the interval is above 0", False: "P2 not met: the interval reaches 0 or "
                       "below", None: "not measured (one fine-tuning seed a side)"}[t["p2_met"]]
            lines.append(f"- pooled over pre-training seeds: {ref} - {variant} {d['diff']:+.2f} "
                         f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] points; {verdict}. The interval is over "
                         "fine-tuning seeds; with this few pre-training seeds their variance is not in it.")
        lines.append("")
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
    p.add_argument("--out", help="output dir (default: the recipe's out, else runs/premise/<recipe>)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--variants", help="comma-separated: pre-train only these variants (and the reference) in this "
                   "invocation; the report covers every variant of the recipe")
    p.add_argument("--report-only", action="store_true", help="rewrite results.json and report.md from the runs")
    p.add_argument("overrides", nargs="*", help="recipe key=value overrides, e.g. seeds=1,2,3")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from tcd_ds.experiments import ExperimentError, Stopped, _stop_on_signals, resolve_ds_config

    args = parse_args(argv)
    try:
        name, rc = load(args.recipe, args.overrides)
        steps = [x.strip() for x in args.steps.split(",") if x.strip()]
        if bad := [x for x in steps if x not in STEPS]:
            raise ExperimentError(f"unknown step {bad[0]!r}; steps: {', '.join(STEPS)}")
        only = [x.strip() for x in args.variants.split(",") if x.strip()] if args.variants else None
        if bad := [x for x in only or [] if x not in rc["variants"]]:
            raise ExperimentError(f"--variants: {bad[0]!r} is not a variant of the recipe ({', '.join(rc['variants'])})")
    except ExperimentError as err:
        fail(err)
    out = Path(args.out or rc["out"] or f"runs/premise/{name}")
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m tcd_ds.premise " + " ".join(argv if argv is not None else sys.argv[1:])
    command = command.replace(str(Path.home()), "~")  # the report names no machine's home
    if not args.report_only:
        rc["ds_config"], _ = resolve_ds_config(rc["ds_config"], out, rc["ranks"])
        p = pipeline(rc, out, name)
        previous = _stop_on_signals()  # SIGTERM / SIGHUP stop the trainers (each saves) before exiting
        try:
            if "pretrain" in steps:
                train_all(p, rc, out, only)
            if "transfer" in steps:
                p.step = "transfer"
                transfer(p, rc, out, analyze(rc, out))
        except ExperimentError as err:
            fail(err, 1)
        except (Stopped, KeyboardInterrupt) as err:
            sig = signal.Signals(err.signum if isinstance(err, Stopped) else signal.SIGINT)
            fail(f"stopped by {sig.name}: the trainers saved their checkpoints; re-run the same command to resume",
                 128 + sig.value)
        finally:
            p.drain_quietly()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    results = analyze(rc, out)
    results["transfer"] = transfer_results(rc, out, results)
    write_json_atomic(out / "results.json", {**results, "recipe": rc, "written": time.strftime("%Y-%m-%d %H:%M:%S")})
    write_text_atomic(out / "report.md", report(rc, results, command))
    print(f"premise study: {out / 'report.md'}")
    return results


if __name__ == "__main__":
    main()
