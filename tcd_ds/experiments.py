"""The paper's protocol as one resumable, recipe-driven pipeline.

    python -m tcd_ds.experiments <recipe> [--out DIR] [--steps a,b] [--dry-run] [key=value ...]

`<recipe>`: a name in `tcd_ds/recipes/experiments/` (`tiny`, `small`) or a YAML path; `key=value`
pairs override it (`glue.seeds=1,2`, `pretrain.train.max_steps=50`, `ranks=1`); the keys, their
types and defaults are `tcd_ds/experiment_config.py`'s. Steps, each under `<out>/<step>/`:

1. teacher    pre-train the vanilla (dense) teacher (or copy a finished one: `teacher_from=<out dir>`);
2. pretrain   the MoE baseline and the TCD student: same data, seed and steps (epoch-aligned);
3. align      the earliest baseline checkpoint whose val MLM loss <= the student's is exported
              (perf-aligned): from the baseline's own checkpoints when it gets there, else from a
              longer baseline (`align.factor` x steps, eval + save every `align.every`);
4. ablations  TCD with position subsets (T, I, A, TI, ...), same steps; fine-tuned on `ablations.tasks`;
5. trend      `trend.task` fine-tuned from checkpoints along pre-training, baseline vs TCD;
6. ood        MLM loss out of distribution (Gutenberg) vs in-domain for loss-aligned models;
7. analyze    relation loss and linear CKA to the teacher, per layer and position, of the baselines,
              the student and the ablations, on each held-out eval corpus (`python -m tcd_ds.analyze`);
8. glue       fine-tune teacher, baselines, student (and a random-init model) on `glue.tasks`.

Every unit of work (one training, one fine-tuning sweep, one export) ends by atomically writing
`done.json` in its directory; a re-run skips finished units, and an unfinished training resumes
from its latest checkpoint (the trainer's `--resume auto`). A training unit whose settings changed
since it finished is refused (use another --out); a fine-tuning unit is re-run (its sweep resumes).
`<out>/report.md` (tables and PNG plots, see `tcd_ds/report.py`) is rewritten at the end.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import yaml

from tcd_ds import resources
from tcd_ds.atomic import publish_dir, read_json, write_json_atomic, write_text_atomic
from tcd_ds.cli import fail, format_duration
from tcd_ds.config import ConfigError, apply_overrides, build_config, from_dict, trained_vocab_size
from tcd_ds.data.paths import looks_like_path
from tcd_ds.dist import free_port
from tcd_ds.experiment_config import ExperimentConfig
from tcd_ds.experiment_layout import (
    STEPS, aligned_dir, analyzed_models, glue_models, random_init_dir, run_dirs, task_settings, trend_from_glue,
    trend_steps)

RECIPES = resources.recipes("experiments")
TRAIN_PY = Path(__file__).parent / "train.py"
FREE = ("pretrain", "teacher")  # free sections of trainer keys (validated by tcd_ds.config), any depth
RESERVED = ("mode", "run_dir", "teacher.path")  # set by the pipeline


class ExperimentError(ValueError):
    """A bad recipe or a failed unit: one line for the user."""


class Stopped(BaseException):
    """SIGTERM, SIGHUP or SIGINT reached the pipeline: it stops its trainers (each saves a checkpoint)
    and fine-tunings, records the invocation and exits with 128 + the signal's number. A
    BaseException, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_on_signals() -> dict:
    """Turn SIGTERM and SIGHUP into `Stopped` in the main thread (SIGINT comes as KeyboardInterrupt).
    By default they would end this process at once, leaving its trainer running on without it;
    returns the handlers to restore. Later signals are ignored while the pipeline stops."""
    def handle(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    return {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGHUP)}


# --- recipe -------------------------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _trainer_overrides(section: dict) -> list[str]:
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in _flatten(section).items()]


def load_section_recipe(cls: type, directory: Path, recipe: str, overrides: list[str], kind: str) -> tuple[str, Any]:
    """(name, validated `cls` tree) of a recipe given by path or by name in `directory`, with
    key=value `overrides`: the premise and replication recipes' one loader; a bad one is one
    ExperimentError line naming the `kind` of recipe."""
    path = Path(recipe) if Path(recipe).is_file() else directory / f"{recipe}.yaml"
    if not path.is_file():
        raise ExperimentError(f"{kind} recipe {recipe!r} is neither a file nor {directory / (recipe + '.yaml')}")
    try:
        return path.stem, apply_overrides(from_dict(cls, yaml.safe_load(path.read_text()) or {}), list(overrides))
    except (ConfigError, yaml.YAMLError) as err:
        raise ExperimentError(str(err).splitlines()[0]) from None


def load(recipe: str, overrides: list[str] = ()) -> tuple[str, dict]:
    """(recipe name, resolved and validated recipe dict)."""
    path = Path(recipe)
    if not path.is_file():
        path = RECIPES / f"{recipe}.yaml"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
            raise ExperimentError(f"experiment recipe {recipe!r} is neither a file nor one of: {names}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ExperimentError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    try:
        rc = apply_overrides(from_dict(ExperimentConfig, data), list(overrides)).as_dict()
    except ConfigError as err:
        raise ExperimentError(str(err)) from None
    validate(rc)
    return path.stem, rc


def resolve_ds_config(value: str, out: Path, ranks: int = 2) -> tuple[str, str]:
    """`ds_config: auto` is the faster CPU config for this CPU (`tcd_ds.hardware.cpu_ds_config`: bf16
    where the CPU has bf16 matmul instructions, fp32 otherwise), chosen once per experiment and kept
    in `<out>/ds_config.auto`, so a later session on another kind of CPU continues the same way.
    Returns (config path, how it was chosen)."""
    from tcd_ds.hardware import cpu_ds_config

    if value != "auto":
        return value, "given"
    record = out / "ds_config.auto"
    if record.is_file():
        return record.read_text().strip(), f"auto, kept from this experiment's first run ({record})"
    chosen = cpu_ds_config(moe=True, ranks=ranks)  # one config for every run: the MoE runs' faster one
    write_text_atomic(record, chosen + "\n")
    return chosen, "auto, chosen for this CPU"


def _ds_config(path: str) -> Path:
    found = Path(resources.ds_config(path))  # a path of the user's, or a shipped ds_configs/ file
    if found.is_file():
        return found
    raise ExperimentError(f"ds_config {path} does not exist")


def validate(rc: dict) -> None:
    """What spans the recipe and the trainer's config (each recipe section checks its own values,
    `tcd_ds.experiment_config`): the ds_config exists, the trainer keys build the teacher's, the
    baseline's and the student's configs, trend.every fits the steps. Fills rc['_steps'] and
    rc['_teacher_steps']."""
    if rc["ds_config"] != "auto":
        _ds_config(rc["ds_config"])
    t = rc["trend"]
    for section in FREE:
        for item in _trainer_overrides(rc[section]):
            if item.split("=", 1)[0] in RESERVED:
                raise ExperimentError(f"{section}.{item.split('=', 1)[0]} is set by the pipeline; remove it")
    try:
        common = _trainer_overrides(rc["pretrain"])
        steps = build_config(rc["model_recipe"], common + ["mode=tcd", "teacher.path=x"]).train.max_steps
        build_config(rc["model_recipe"], common + ["mode=moe"])
        teacher = build_config(rc["model_recipe"], common + _trainer_overrides(rc["teacher"]) + ["mode=vanilla"])
    except ConfigError as err:
        raise ExperimentError(f"pretrain/teacher: {err}") from None
    if not 1 <= t["every"] <= steps:
        raise ExperimentError(f"trend.every must be in [1, pre-training steps={steps}], got {t['every']}")
    rc["_steps"], rc["_teacher_steps"] = steps, teacher.train.max_steps


DATA_STEPS = {"teacher", "pretrain", "align", "ablations", "trend", "ood", "analyze"}  # read the corpora
GLUE_STEPS = {"ablations", "trend", "glue"}  # fine-tune


def check_data(rc: dict, steps: list[str]) -> None:
    """An experiment's report stands on its data, so every path it reads must be there before any
    unit runs. The trainer replaces a missing *default* corpus by bundled text and skips a missing
    eval corpus (right for a smoke run, `tcd_ds/data/fallback.py`); here that would report figures
    on the wrong text, without a Gutenberg loss, from a clone whose `../shared` is elsewhere."""
    paths = {}
    if DATA_STEPS & set(steps):
        for section in ("pretrain", "teacher"):
            extra = _trainer_overrides(rc["teacher"]) if section == "teacher" else []
            data = build_config(rc["model_recipe"], _trainer_overrides(rc["pretrain"]) + extra + ["mode=moe"]).data
            paths.setdefault(f"{section}.data.corpus", data.corpus)
            if trained_vocab_size(data.vocab) is None:
                paths.setdefault(f"{section}.data.vocab", data.vocab)
            paths.update({f"{section}.data.eval_corpora ({k})": v for k, v in data.eval_sets().items()})
    if GLUE_STEPS & set(steps):
        paths["glue.dir"] = rc["glue"]["dir"]
    for key, path in paths.items():
        if looks_like_path(path) and not Path(path).expanduser().exists():
            raise ExperimentError(f"{key} {path} not found (from {os.getcwd()}): an experiment reads its real data "
                                  f"and never falls back; run it from the repo root with shared/ beside the repo, "
                                  f"or give the path as a recipe override ({key.split(' ')[0]}=...)")

# --- units --------------------------------------------------------------------------------------

def _trainer_defaults() -> dict[str, Any]:
    from tcd_ds.config import Config, to_dict

    return {f"config.{k}": v for k, v in _flatten(to_dict(Config())).items()}


def changed_settings(recorded: Any, now: Any) -> list[str]:
    """How a unit's fingerprint `now` differs from the `recorded` one (`key old -> new`; [] when the
    same). A trainer key that the recorded fingerprint lacks and that is at its default now does not
    count: a later tcd-ds added it, and its default is what the finished run did without it."""
    if not isinstance(recorded, dict) or not isinstance(now, dict):
        return [] if recorded == now else ["fingerprint"]
    before, after, defaults = _flatten(recorded), _flatten(now), _trainer_defaults()
    missing = object()
    return [f"{k}: {before.get(k, '(absent)')} -> {after.get(k, '(absent)')}" for k in {**before, **after}
            if before.get(k, missing) != after.get(k, missing)
            and not (k not in before and k in defaults and after[k] == defaults[k])]


def _listed(changed: list[str]) -> str:
    """The first three changed settings, for one line."""
    return ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


class Pipeline:
    def __init__(self, name: str, rc: dict, out: Path):
        self.name, self.rc, self.out = name, rc, out
        self.t0 = time.perf_counter()
        self.ran, self.skipped = [], []  # unit names
        self.step = ""
        self.running: list = []  # (process, log file, finish callback) of fine-tuning units
        self.training: list = []  # trainer processes now running (two in step pretrain side by side)

    def env(self, threads: int | None = None) -> dict[str, str]:
        threads = self.rc["threads"] if threads is None else threads
        return {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}

    def finetune_threads(self) -> int:
        return self.rc["glue"]["threads"] or self.rc["threads"]

    def say(self, text: str) -> None:
        print(f"[{format_duration(time.perf_counter() - self.t0)}] {text}", flush=True)

    def log(self, name: str = "train.log") -> Path:
        (self.out / self.step).mkdir(parents=True, exist_ok=True)
        return self.out / self.step / name

    def portable(self, fingerprint: Any) -> Any:
        """`fingerprint` with this out dir written `<out>`: the same settings in another out dir match."""
        return json.loads(json.dumps(fingerprint).replace(str(self.out.resolve()), "<out>"))

    def unit(self, directory: Path, fingerprint: Any, work: Callable[[], dict | None], strict: bool = True,
             deferred: bool = False) -> dict | None:
        """Run `work` unless `directory/done.json` says it was done with this fingerprint. A deferred
        `work` starts a process (appended to self.running); done.json is written when it ends."""
        name = str(directory.relative_to(self.out))
        done = read_json(directory / "done.json")
        fingerprint = self.portable(fingerprint)
        changed = None if done is None else changed_settings(done.get("fingerprint"), fingerprint)
        if done is not None and not changed:
            self.skipped.append(name)
            self.say(f"  {name}: done, skipped")
            return done
        if done is not None and strict:
            raise ExperimentError(f"{directory} was done with other settings ({_listed(changed)}): use another "
                                  "--out or delete it")
        if deferred:
            work()  # waits for a free slot, then starts the process
        self.say(f"  {name}: start")
        start = time.perf_counter()

        def finished(info: dict) -> dict:
            done = {"unit": name, **info, "fingerprint": fingerprint, "seconds": round(time.perf_counter() - start, 2),
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            write_json(directory / "done.json", done)
            self.ran.append(name)
            self.say(f"  {name}: finished in {format_duration(done['seconds'])}")
            return done

        if not deferred:
            return finished(work() or {})
        proc, log, finish = self.running[-1]
        self.running[-1] = (proc, log, lambda p: finished(finish(p)))
        return None

    # --- training ---

    def training_spec(self, run_dir: Path, mode: str, extra: list[str],
                      teacher: bool = False) -> tuple[list[str], Any, dict]:
        """One run's trainer arguments, its resolved config and its unit's fingerprint."""
        from tcd_ds.config import to_dict

        rc = self.rc
        ds = str(_ds_config(rc["ds_config"]))
        overrides = [*_trainer_overrides(rc["pretrain"]), *(_trainer_overrides(rc["teacher"]) if teacher else []),
                     *extra, f"run_dir={run_dir.resolve()}"]
        args = ["--config", rc["model_recipe"], "--mode", mode, "--deepspeed_config", ds, *overrides]
        try:
            cfg = build_config(rc["model_recipe"], [f"mode={mode}", *overrides])  # what the trainer will run
        except ConfigError as err:
            raise ExperimentError(f"{run_dir}: {err}") from None
        return args, cfg, {"ranks": rc["ranks"], "config": to_dict(cfg), "ds_config": read_json(ds)}

    def train(self, run_dir: Path, mode: str, extra: list[str], teacher: bool = False,
              threads: int | None = None, log: str = "train.log") -> dict:
        """Train (or resume) one run as a unit, with `threads` OMP threads (None: the recipe's);
        its output goes to `<out>/<step>/<log>`."""
        args, cfg, fingerprint = self.training_spec(run_dir, mode, extra, teacher)
        steps = cfg.train.max_steps

        def work() -> dict:
            summary = read_json(run_dir / "summary.json")
            if not (summary and not summary.get("interrupted") and (summary.get("steps", 0) >= steps
                                                                    or summary.get("target_reached"))):
                self._launch(args, run_dir, threads, self.log(log))
                summary = read_json(run_dir / "summary.json")
                if not summary or summary.get("interrupted"):
                    raise ExperimentError(f"training {run_dir} stopped before the end; re-run to resume")
            return {"steps": summary["steps"], "eval": summary.get("eval")}

        return self.unit(run_dir, fingerprint, work)

    def trainer_command(self, args: list[str]) -> list[str]:
        """The trainer's command line: one process, or the deepspeed launcher for `ranks` > 1."""
        ranks = self.rc["ranks"]
        if ranks == 1:
            return [sys.executable, "-m", "tcd_ds.train", *args]
        launcher = shutil.which("deepspeed")
        launcher = [launcher] if launcher else [sys.executable, "-m", "deepspeed.launcher.runner"]
        return [*launcher, "--num_accelerators", str(ranks), "--master_port", str(free_port()), str(TRAIN_PY), *args]

    def _launch(self, args: list[str], run_dir: Path, threads: int | None, log: Path) -> None:
        cmd = self.trainer_command(args)
        with open(log, "a") as f:
            f.write(f"\n===== {time.strftime('%H:%M:%S')} {run_dir}\n$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env(threads))
            self.training.append(proc)
            try:
                while True:
                    try:
                        rc = proc.wait(timeout=60)
                        break
                    except subprocess.TimeoutExpired:
                        self.say(f"    {run_dir.name}: {_last_progress(log)}")
            except BaseException:
                _stop(proc)
                raise
            finally:
                self.training.remove(proc)
        if rc == 85:  # the trainer's REQUEUE_EXIT: stopped by a signal after saving a checkpoint
            raise ExperimentError(f"training {run_dir} was stopped by a signal (checkpoint saved); re-run to resume")
        if rc != 0:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise ExperimentError(f"training {run_dir} failed (exit {rc}); see {log}: {tail[-400:]}")

    # --- fine-tuning: subprocesses, up to `jobs` at a time; `drain()` waits for them ---

    def finetune(self, model_dir: Path, task: str, out_dir: Path, lrs=None, seeds=None,
                 before: Callable[[], None] | None = None) -> None:
        g, ts = self.rc["glue"], task_settings(self.rc, task)
        argv = ["--model", str(model_dir.resolve()), "--task", task, "--glue-dir", g["dir"],
                "--lrs", ",".join(f"{x:g}" for x in (lrs or ts["lrs"])),
                "--seeds", ",".join(map(str, seeds or g["seeds"])),
                "--epochs", str(ts["epochs"]),
                "--out", str(out_dir.resolve()), "--max-train-examples", str(g["max_train_examples"]),
                "--max-eval-examples", str(g["max_eval_examples"]), "--batch-size", str(ts["batch_size"]),
                "--max-seq-len", str(g["max_seq_len"]), "--threads", str(self.finetune_threads())]

        def start() -> None:
            if before:
                before()
            while len(self.running) >= self.rc["jobs"]:
                self._reap()
            out_dir.mkdir(parents=True, exist_ok=True)
            log = open(out_dir / "finetune.log", "a")
            proc = subprocess.Popen([sys.executable, "-m", "tcd_ds.finetune", *argv], stdout=log,
                                    stderr=subprocess.STDOUT, env=self.env(self.finetune_threads()))
            self.running.append((proc, log, finish))

        def finish(proc) -> dict:
            if proc.returncode != 0:
                tail = (out_dir / "finetune.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise ExperimentError(f"fine-tuning {task} from {model_dir} failed (exit {proc.returncode}); "
                                      f"see {out_dir / 'finetune.log'}: {' '.join(tail)[-300:]}")
            res = read_json(out_dir / "results.json")
            return {"task": task, "best_lr": res["best_lr"], "glue_score": res["glue_score"]}

        self.unit(out_dir, {"argv": argv}, start, strict=False, deferred=True)

    def _reap(self) -> None:
        """Wait until one running fine-tuning ends; write its done.json (or fail)."""
        while True:
            for item in self.running:
                proc, log, finish = item
                if proc.poll() is not None:
                    self.running.remove(item)
                    log.close()
                    finish(proc)
                    return
            time.sleep(0.2)

    def drain_quietly(self) -> None:
        for proc, log, _ in self.running:
            proc.terminate()
            proc.wait()
            log.close()
        self.running.clear()

    def drain(self) -> None:
        try:
            while self.running:
                self._reap()
        except BaseException:
            self.drain_quietly()
            raise


def _stop(proc: subprocess.Popen) -> None:
    """End a trainer: on SIGTERM it saves a checkpoint, then exits (resumable)."""
    proc.terminate()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()


def _last_progress(log: Path) -> str:
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4000))
        lines = f.read().decode(errors="replace").replace("\r", "\n").splitlines()
    return next((x.strip()[:160] for x in reversed(lines) if x.strip().startswith(("step ", "eval "))), "running")


def task_unavailable(glue_dir: str, task: str) -> str | None:
    """Why `task` cannot be fine-tuned here (a missing train or dev split), else None."""
    from tcd_ds.data.glue import GlueDataError, read_split

    try:
        for split in ("train", "dev"):
            read_split(glue_dir, task, split)
    except GlueDataError as err:
        return str(err)
    return None


def select_aligned(eval_history: list[dict], saved_steps, target: float, key: str = "val") -> dict:
    """The earliest saved step whose `key` MLM loss <= target; else the last one, marked not reached."""
    saved = set(saved_steps)
    points = sorted((e["step"], e[key]["mlm_loss"]) for e in eval_history if e["step"] in saved and key in e)
    if not points:
        raise ExperimentError("no evaluated checkpoint to align on (is align.every a multiple of the eval cadence?)")
    for step, loss in points:
        if loss <= target:
            return {"step": step, "mlm_loss": loss, "target": target, "reached": True}
    return {"step": points[-1][0], "mlm_loss": points[-1][1], "target": target, "reached": False}


# --- the steps ----------------------------------------------------------------------------------

def step_teacher(p: Pipeline) -> None:
    if p.rc["teacher_from"]:
        copy_teacher(p, Path(p.rc["teacher_from"]).expanduser())
    p.train(run_dirs(p.out, p.rc)["teacher"], "vanilla", [], teacher=True)


def copy_teacher(p: Pipeline, source: Path) -> None:
    """`teacher_from`: copy another out dir's finished teacher run, and its GLUE sweeps, into this
    one, once; step teacher then finds it done. Refused (nothing copied) when that teacher was
    trained with other settings than this recipe gives it, e.g. a `pretrain.seed` it took: pin
    them for the teacher (`teacher.seed=<its seed>`)."""
    here, there = run_dirs(p.out, p.rc)["teacher"], run_dirs(source, p.rc)["teacher"]
    if (here / "done.json").is_file():
        return
    if source.resolve() == p.out.resolve():
        raise ExperimentError("teacher_from names this out dir: name another experiment's")
    if here.exists():
        raise ExperimentError(f"teacher_from: {here} holds an unfinished teacher of its own; delete it or "
                              "drop teacher_from")
    done = read_json(there / "done.json")
    if done is None:
        raise ExperimentError(f"teacher_from={source}: no finished teacher there ({there / 'done.json'})")
    now = p.portable(p.training_spec(here, "vanilla", [], teacher=True)[2])
    changed = changed_settings(done.get("fingerprint"), now)
    if changed:
        raise ExperimentError(f"teacher_from={source}: its teacher was trained with other settings "
                              f"({_listed(changed)}); set them for the teacher (teacher.<key>=<value>) or train "
                              "one here")

    def copy_of(src: Path) -> Callable[[Path], None]:
        return lambda tmp: shutil.copytree(src, tmp, symlinks=True, dirs_exist_ok=True)

    glue = [t for t in (source / "glue" / "teacher").glob("*") if (t / "done.json").is_file()]
    for task in glue:
        publish_dir(p.out / "glue" / "teacher" / task.name, copy_of(task))
    publish_dir(here, copy_of(there))  # last: the run's done.json says the copy is whole
    p.say(f"  teacher: copied from {source} (the run and {len(glue)} GLUE sweep(s))")


def _keep_all(steps: int, every: int) -> list[str]:
    return [f"train.save_every={every}", f"train.keep_checkpoints={math.ceil(steps / every) + 1}"]


def _teacher_path(p: Pipeline) -> str:
    teacher = run_dirs(p.out, p.rc)["teacher"]
    if not (teacher / "export" / "config.json").is_file():
        raise ExperimentError(f"step pretrain needs the teacher: run step teacher first ({teacher})")
    return f"teacher.path={teacher.resolve()}"


def _pretrain_cadence(rc: dict) -> list[str]:
    """Eval + keep a checkpoint every gcd(align.every, trend.every) steps in the baseline and the
    student (the same for both): step trend fine-tunes from these checkpoints, and step align can
    take the performance-aligned baseline from the baseline's own ones (see `step_align`)."""
    every = math.gcd(rc["align"]["every"], rc["trend"]["every"])
    return [f"train.eval_every={every}", *_keep_all(rc["_steps"], every)]


def step_pretrain(p: Pipeline) -> None:
    """The MoE baseline and the TCD student: the same data, steps and cadence. With
    `pretrain_jobs: 2` they train side by side, each on max(1, threads // 2) threads; each run logs
    to `<out>/pretrain/<run>.log`."""
    dirs, cadence = run_dirs(p.out, p.rc), _pretrain_cadence(p.rc)
    runs = [(dirs["baseline"], "moe", cadence), (dirs["tcd"], "tcd", [_teacher_path(p), *cadence])]
    jobs = p.rc["pretrain_jobs"]
    threads = None if jobs == 1 else max(1, p.rc["threads"] // jobs)
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(p.train, run_dir, mode, extra, threads=threads, log=f"{run_dir.name}.log")
                   for run_dir, mode, extra in runs]
        try:
            for future in as_completed(futures):  # the first to fail, whichever it is, stops the step
                future.result()
        except BaseException:
            for future in futures:  # one run failed or the pipeline was stopped: start no other,
                future.cancel()
            for proc in list(p.training):  # and stop the one still training
                _stop(proc)
            raise


def _final_val(run_dir: Path) -> float:
    summary = read_json(run_dir / "summary.json")
    if not summary or "eval" not in summary:
        raise ExperimentError(f"{run_dir} has no finished summary.json: run the earlier steps first")
    return summary["eval"]["val"]["mlm_loss"]


def _aligned_selection(run_dir: Path, target: float) -> dict:
    from tcd_ds.checkpoint import complete_checkpoints

    history = read_json(run_dir / "summary.json")["eval_history"]
    return select_aligned(history, [s for _, s in complete_checkpoints(run_dir / "checkpoints")], target)


def step_align(p: Pipeline) -> None:
    """The performance-aligned baseline: the earliest baseline checkpoint whose val MLM loss is at
    or below the student's final one. When the epoch-aligned baseline already gets there (the
    student is no better at MLM), it is taken from that run's own checkpoints and no longer run is
    trained; otherwise a baseline scheduled for `align.factor` x steps is trained until its first eval
    at or below the target (`train.stop_at_val_loss`: no step after the one taken is trained)."""
    from tcd_ds.checkpoint import export_checkpoint

    dirs, a = run_dirs(p.out, p.rc), p.rc["align"]
    target = _final_val(dirs["tcd"])
    source, long_steps = "baseline", None
    sel = _aligned_selection(dirs["baseline"], target)
    if not sel["reached"]:
        source, long_steps = "baseline_long", max(1, round(a["factor"] * p.rc["_steps"]))
        p.train(dirs[source], "moe", [f"train.max_steps={long_steps}", f"train.eval_every={a['every']}",
                                      f"train.stop_at_val_loss={target!r}", *_keep_all(long_steps, a["every"])])
        sel = _aligned_selection(dirs[source], target)
    unit_dir = aligned_dir(p.out)

    def work() -> dict:
        export_checkpoint(dirs[source] / "checkpoints" / f"step_{sel['step']:08d}", unit_dir / "export")
        _copy_vocab(dirs[source], unit_dir / "export")
        return {**sel, "source": source, "student_steps": p.rc["_steps"], "baseline_steps": p.rc["_steps"],
                "baseline_val": _final_val(dirs["baseline"]), "long_steps": long_steps,
                "long_ran": read_json(dirs[source] / "summary.json")["steps"] if long_steps else None,
                "long_val": _final_val(dirs[source]) if long_steps else None}

    p.unit(unit_dir, {**sel, "source": source}, work)


def _copy_vocab(run_dir: Path, export: Path) -> None:
    vocab = run_dir / "export" / "vocab.txt"
    if vocab.is_file():
        shutil.copyfile(vocab, export / "vocab.txt")


def step_ablations(p: Pipeline) -> None:
    dirs = run_dirs(p.out, p.rc)
    teacher = _teacher_path(p)
    for pos in p.rc["ablations"]["positions"]:
        p.train(dirs[f"tcd_{pos}"], "tcd", [teacher, f"distill.positions={pos}"])
    for pos in p.rc["ablations"]["positions"]:
        for task in p.rc["ablations"]["tasks"]:
            if task_unavailable(p.rc["glue"]["dir"], task) is None:
                p.finetune(dirs[f"tcd_{pos}"] / "export", task, p.out / "ablations" / pos / task)


def step_trend(p: Pipeline) -> None:
    from tcd_ds.checkpoint import export_checkpoint

    dirs, t = run_dirs(p.out, p.rc), p.rc["trend"]
    for variant in ("baseline", "tcd"):
        for s in trend_steps(p.rc):
            if trend_from_glue(p.rc, s):  # step glue fine-tunes these very weights with these settings
                continue
            tag_dir = dirs[variant] / "checkpoints" / f"step_{s:08d}"
            export = p.out / "trend" / variant / f"step_{s:08d}" / "export"

            def before(tag_dir=tag_dir, export=export, variant=variant) -> None:
                if not (tag_dir / "complete.json").is_file():
                    raise ExperimentError(f"{tag_dir} is missing: the pre-training run did not keep it")
                export_checkpoint(tag_dir, export)
                _copy_vocab(dirs[variant], export)

            p.finetune(export, t["task"], export.parent, t["lrs"] or None, t["seeds"] or None, before)


def ood_analysis(rc: dict, out: Path) -> dict:
    from tcd_ds.report import interpolate

    dirs = run_dirs(out, rc)
    aligned = read_json(aligned_dir(out) / "done.json")
    if aligned is None or not (dirs["tcd"] / "summary.json").is_file():
        raise ExperimentError("step ood needs step align first")
    long = read_json(dirs[aligned.get("source", "baseline_long")] / "summary.json")["eval_history"]
    row = next(e for e in long if e["step"] == aligned["step"])
    student = read_json(dirs["tcd"] / "summary.json")["eval"]
    models = {"baseline_aligned": {**row, "step": aligned["step"]}, "tcd": {**student, "step": rc["_steps"]}}
    for name in ("teacher", "baseline"):
        models[name] = {**read_json(dirs[name] / "summary.json")["eval"],
                        "step": rc["_teacher_steps"] if name == "teacher" else rc["_steps"]}
    curve = [(e["val"]["mlm_loss"], e["gutenberg"]["mlm_loss"]) for e in long if "gutenberg" in e]
    interp = interpolate(curve, student["val"]["mlm_loss"]) if "gutenberg" in student else None
    return {"models": models, "baseline_gutenberg_at_student_val": interp}


def step_ood(p: Pipeline) -> None:
    aligned = read_json(aligned_dir(p.out) / "done.json") or {}
    p.unit(p.out / "ood" / "analysis", {"aligned": aligned.get("step"), "target": aligned.get("target")},
           lambda: ood_analysis(p.rc, p.out))


def _sha256(path: Path) -> str:
    """The content hash of a file (a re-exported but identical model is not analysed again)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def step_analyze(p: Pipeline) -> None:
    from tcd_ds.analyze import analyze

    cfg = build_config(p.rc["model_recipe"], [*_trainer_overrides(p.rc["pretrain"]), "mode=vanilla"])
    teacher = run_dirs(p.out, p.rc)["teacher"] / "export"
    if not (teacher / "config.json").is_file():
        raise ExperimentError(f"step analyze needs the teacher: run step teacher first ({teacher})")
    corpora = {k: v for k, v in cfg.data.eval_sets().items() if Path(v).exists()}
    n = p.rc["analyze"]["sequences"]
    for name, model in analyzed_models(p.out, p.rc).items():
        for corpus, path in corpora.items():
            unit_dir = p.out / "analyze" / name / corpus
            fingerprint = {"model": str(model.resolve()), "corpus": path, "sequences": n,
                           "seq_len": cfg.data.max_seq_len, "weights": _sha256(model / "model.safetensors")}
            p.unit(unit_dir, fingerprint, lambda model=model, path=path: analyze(
                str(model), str(teacher), path, n, cfg.data.max_seq_len, cache_dir=cfg.data.cache_dir,
                progress=False), strict=False)


class _Plain:
    """A plain module where `train.evaluate` expects an engine (`engine(...)`, `engine.module`)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def random_init_model(p: Pipeline) -> None:
    """The no-pre-training row: the teacher's architecture from the pre-training seed's random init,
    exported like a trained model (with the same vocab), and its held-out MLM figures (world of one:
    the first `eval_batches` x micro-batch sequences of each eval set, fixed masks)."""
    import torch

    from tcd_ds.dist import detect_layout
    from tcd_ds.model.bert import BertForMaskedLM
    from tcd_ds.model.hf import config_from_hf, save_pretrained
    from tcd_ds.train import build_data, evaluate, resolve_data

    teacher = run_dirs(p.out, p.rc)["teacher"] / "export"
    if not (teacher / "config.json").is_file():
        raise ExperimentError(f"the random-init row needs the teacher's export for its architecture: {teacher}")
    hf = read_json(teacher / "config.json")
    cfg = build_config(p.rc["model_recipe"], [*_trainer_overrides(p.rc["pretrain"]), "mode=vanilla"])
    unit_dir = random_init_dir(p.out)

    def work() -> dict:
        model_cfg = config_from_hf(hf)
        torch.manual_seed(cfg.seed)
        model = BertForMaskedLM(model_cfg)
        save_pretrained(model, model_cfg, unit_dir / "export")
        _copy_vocab(teacher.parent, unit_dir / "export")
        layout = detect_layout()
        data = build_data(resolve_data(cfg, layout), layout)  # the corpus and vocab the teacher used
        device = torch.device("cpu")
        evals = {"val": evaluate(_Plain(model), data, data.val, cfg, layout, device)}
        for name, dataset in data.evals.items():
            evals[name] = evaluate(_Plain(model), data, dataset, cfg, layout, device)
        return {"seed": cfg.seed, "eval": evals}

    p.unit(unit_dir, {"seed": cfg.seed, "config": hf}, work)


def step_glue(p: Pipeline) -> None:
    g = p.rc["glue"]
    skipped = {t: why for t in g["tasks"] if (why := task_unavailable(g["dir"], t))}
    for task, why in skipped.items():
        p.say(f"  glue {task}: skipped ({why})")
    write_json(p.out / "glue" / "skipped.json", skipped)
    if g["include_random"]:
        random_init_model(p)
    for variant, model in glue_models(p.out, p.rc).items():
        if not (model / "config.json").is_file():
            raise ExperimentError(f"step glue needs {model}: run the earlier steps first")
        for task in g["tasks"]:
            if task not in skipped:
                p.finetune(model, task, p.out / "glue" / variant / task)


STEP_FNS = {"teacher": step_teacher, "pretrain": step_pretrain, "align": step_align,
            "ablations": step_ablations, "trend": step_trend, "ood": step_ood, "analyze": step_analyze,
            "glue": step_glue}


# --- command line -------------------------------------------------------------------------------

def parse_args(argv):
    from tcd_ds.cli import Parser

    p = Parser(prog="python -m tcd_ds.experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="experiment recipe: a name in tcd_ds/recipes/experiments/ or a YAML path")
    p.add_argument("--out", help="output dir (default: the recipe's out, else runs/experiments/<recipe>)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("overrides", nargs="*", help="recipe key=value overrides, e.g. glue.seeds=1,2")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from tcd_ds import report

    args = parse_args(argv)
    try:
        name, rc = load(args.recipe, args.overrides)
        steps = [s.strip() for s in args.steps.split(",") if s.strip()]
        bad = [s for s in steps if s not in STEPS]
        if bad:
            raise ExperimentError(f"unknown step {bad[0]!r}; steps: {', '.join(STEPS)}")
        if not args.dry_run:
            check_data(rc, steps)
    except ExperimentError as err:
        fail(err)
    out = Path(args.out or rc["out"] or f"runs/experiments/{name}")
    if args.dry_run:
        print(yaml.safe_dump({k: v for k, v in rc.items() if not k.startswith("_")}, sort_keys=False))
        return {"recipe": rc, "out": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    rc["ds_config"], how = resolve_ds_config(rc["ds_config"], out, rc["ranks"])
    command = "python -m tcd_ds.experiments " + " ".join(argv if argv is not None else sys.argv[1:])
    command = command.replace(str(Path.home()), "~")  # the report and results.json name no machine's home
    p = Pipeline(name, rc, out)
    p.say(f"experiment {name} -> {out} (steps {', '.join(steps)}); DeepSpeed config {rc['ds_config']} ({how})")
    walls, stopped, step_start = {}, None, None
    previous = _stop_on_signals()
    try:
        for i, step in enumerate(s for s in STEPS if s in steps):
            p.step, step_start = step, time.perf_counter()
            p.say(f"step {STEPS.index(step) + 1}/{len(STEPS)} {step}: start")
            STEP_FNS[step](p)
            p.drain()
            walls[step] = time.perf_counter() - step_start
            units = [read_json(f) for f in sorted((out / step).rglob("done.json")) if f.parent != out / step]
            write_json(out / step / "done.json", {"step": step, "units": len(units), "wall_s_last_invocation":
                                                  round(walls[step], 2), "seconds": round(sum(
                                                      u["seconds"] for u in units if u), 2)})
            p.say(f"step {step}: finished in {format_duration(walls[step])}")
    except ExperimentError as err:
        p.say(f"error: {err}")
        fail(err, 1)
    except (Stopped, KeyboardInterrupt) as err:
        stopped = signal.Signals(err.signum if isinstance(err, Stopped) else signal.SIGINT)
        message = (f"stopped by {stopped.name} in step {p.step}: a training saves its checkpoint on the way out, a "
                   f"fine-tuning is ended; re-run the same command to resume")
        p.say(message)
        fail(message, 128 + stopped.value)
    finally:
        p.drain_quietly()
        if stopped and step_start is not None and p.step not in walls:  # the step running counts up to the signal
            walls[p.step] = time.perf_counter() - step_start
        with open(out / "invocations.jsonl", "a") as f:
            f.write(json.dumps({"command": command, "cwd": os.getcwd(), "started": time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(time.time() - (time.perf_counter() - p.t0))),
                "wall_s": round(time.perf_counter() - p.t0, 1), "steps": walls, "ran": p.ran,
                **({"stopped": stopped.name, "stopped_in": p.step} if stopped else {})}) + "\n")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    path = report.write_report(out, name, rc, command)
    p.say(f"report: {path} ({len(p.ran)} units run, {len(p.skipped)} skipped)")
    return {"out": str(out), "report": str(path), "ran": p.ran, "skipped": p.skipped}


if __name__ == "__main__":
    main()
