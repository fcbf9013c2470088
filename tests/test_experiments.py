"""The experiment pipeline (`python -m tcd_ds.experiments`): its pure parts (recipe validation,
alignment selection, table formatting) and one tiny end-to-end run on the real data, re-run to
check that finished units are skipped and an unfinished training resumes."""
from __future__ import annotations

import copy
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tcd_ds import experiments as ex
from tcd_ds import report

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- pure parts ---------------------------------------------------------------------------------

def _hist(*points):
    return [{"step": s, "val": {"mlm_loss": v}} for s, v in points]


class _FakeAlignPipeline:
    """Just enough of `Pipeline` for `step_align`: trainings are recorded (and write a summary and
    checkpoints as a finished run would), units run their work and keep done.json."""

    def __init__(self, out: Path, rc: dict, long_history=None):
        self.out, self.rc, self.trained, self.long_history = out, rc, [], long_history

    def train(self, run_dir: Path, mode: str, extra: list[str], teacher: bool = False) -> dict:
        self.trained.append((run_dir.name, mode, extra))
        _finished_run(run_dir, self.long_history)
        return {}

    def unit(self, directory: Path, fingerprint, work):
        directory.mkdir(parents=True, exist_ok=True)
        done = work()
        (directory / "done.json").write_text(json.dumps(done))
        return done


def _finished_run(run_dir: Path, history) -> None:
    for step, _ in history:
        tag = run_dir / "checkpoints" / f"step_{step:08d}"
        tag.mkdir(parents=True, exist_ok=True)
        (tag / "complete.json").write_text("{}")
    (run_dir / "summary.json").write_text(json.dumps({
        "steps": history[-1][0], "eval_history": _hist(*history), "eval": {"val": {"mlm_loss": history[-1][1]}}}))


def _align_rc() -> dict:
    return {"_steps": 30, "align": {"factor": 2.0, "every": 10}, "trend": {"every": 15}, "ablations": {"positions": []}}


@pytest.fixture
def exported(monkeypatch):
    """The checkpoint tags step align exports (the export itself is not run)."""
    tags = []
    monkeypatch.setattr("tcd_ds.checkpoint.export_checkpoint", lambda tag, dst: tags.append(tag))
    return tags


def _baseline_and_student(out: Path, student) -> dict:
    dirs = ex.run_dirs(out, _align_rc())
    _finished_run(dirs["baseline"], [(10, 4.0), (20, 3.5), (30, 3.2)])
    _finished_run(dirs["tcd"], student)
    return dirs


def test_align_takes_the_baselines_own_checkpoint_when_it_reaches_the_student(tmp_path, exported):
    dirs = _baseline_and_student(tmp_path, [(10, 4.1), (20, 3.8), (30, 3.6)])  # student worse at MLM
    p = _FakeAlignPipeline(tmp_path, _align_rc())
    ex.step_align(p)
    assert p.trained == []  # no longer baseline is trained
    done = json.loads((ex.aligned_dir(tmp_path) / "done.json").read_text())
    assert done["source"] == "baseline" and done["step"] == 20 and done["reached"] is True
    assert done["long_steps"] is None and exported == [dirs["baseline"] / "checkpoints" / "step_00000020"]


def test_align_trains_a_longer_baseline_when_the_student_is_better(tmp_path, exported):
    dirs = _baseline_and_student(tmp_path, [(10, 3.9), (20, 3.3), (30, 3.0)])  # student better at MLM
    p = _FakeAlignPipeline(tmp_path, _align_rc(), long_history=[(10, 4.0), (20, 3.4), (30, 3.1), (40, 3.0),
                                                                 (50, 2.9), (60, 2.8)])
    ex.step_align(p)
    assert [(name, mode) for name, mode, _ in p.trained] == [("baseline_long", "moe")]
    assert "train.max_steps=60" in p.trained[0][2] and "train.eval_every=10" in p.trained[0][2]
    assert "train.stop_at_val_loss=3.0" in p.trained[0][2]  # the student's final val MLM loss: no step after it
    done = json.loads((ex.aligned_dir(tmp_path) / "done.json").read_text())
    assert done["source"] == "baseline_long" and done["step"] == 40 and done["long_steps"] == 60
    assert done["long_ran"] == 60
    assert exported == [dirs["baseline_long"] / "checkpoints" / "step_00000040"]


def test_pretrain_evaluates_and_keeps_checkpoints_at_the_align_and_trend_cadence():
    cadence = ex._pretrain_cadence(_align_rc())  # gcd(10, 15) = 5 over 30 steps
    assert cadence == ["train.eval_every=5", "train.save_every=5", "train.keep_checkpoints=7"]


def test_the_final_trend_point_comes_from_glue_only_when_glue_runs_it_alike():
    base = ["pretrain.train.max_steps=12", "trend.every=4", "glue.tasks=MRPC,CoLA", "glue.lrs=1e-4", "glue.seeds=1,2,3"]
    assert [ex.trend_from_glue(ex.load("tiny", base)[1], s) for s in (4, 8, 12)] == [False, False, True]
    assert ex.trend_from_glue(ex.load("tiny", [*base, "trend.seeds=2,3"])[1], 12)  # a subset of glue's seeds
    assert ex.trend_from_glue(ex.load("tiny", [*base, "glue.per_task=MRPC:lrs=3e-4"])[1], 12)  # both take the task's
    for other in ("trend.seeds=3,4", "trend.lrs=3e-4", "trend.lrs=1e-4,3e-4", "glue.tasks=CoLA"):
        assert not ex.trend_from_glue(ex.load("tiny", [*base, other])[1], 12), other


def test_select_aligned_takes_earliest_saved_checkpoint_at_or_below_target():
    h = _hist((10, 5.0), (20, 4.2), (30, 3.9), (40, 3.5))
    assert ex.select_aligned(h, [10, 20, 30, 40], 4.0) == {"step": 30, "mlm_loss": 3.9, "target": 4.0,
                                                              "reached": True}
    assert ex.select_aligned(h, [10, 20, 30, 40], 4.2)["step"] == 20  # <= counts
    assert ex.select_aligned(h, [10, 40], 4.0)["step"] == 40  # step 30 has no checkpoint
    miss = ex.select_aligned(h, [10, 20, 30, 40], 3.0)
    assert miss == {"step": 40, "mlm_loss": 3.5, "target": 3.0, "reached": False}
    with pytest.raises(ex.ExperimentError):
        ex.select_aligned(h, [], 4.0)


def test_stats_and_cells_are_median_mean_and_sample_std():
    assert report.fmt_stats([0.80, 0.90, 0.85]) == "85.0 (85.0 ± 5.0)"
    assert report.fmt_stats([0.5, 0.6, 1.0]) == "60.0 (70.0 ± 26.5)"  # median != mean
    assert report.fmt_stats([0.7]) == "70.0 (70.0 ± 0.0)"
    assert report.fmt_stats([]) == "–"
    assert report.fmt_stats([2.0, 4.0], scale=1, digits=2) == "3.00 (3.00 ± 1.41)"
    assert report.md_table(["a", "b"], [[1, "x"], [2, "y"]]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2 | y |"


def test_glue_average_is_taken_per_seed():
    res = {"MRPC": {"glue_score": {"per_seed": [0.8, 0.6]}}, "WNLI": {"glue_score": {"per_seed": [0.4, 0.6]}}}
    assert report.per_seed_average(res) == pytest.approx([0.6, 0.6])
    assert report.per_seed_average({}) == []
    # an unfinished model (one task of two) has no GLUE average, not its one task's score
    assert report.per_seed_average(res, ["MRPC", "WNLI"]) == pytest.approx([0.6, 0.6])
    assert report.per_seed_average({"MRPC": res["MRPC"]}, ["MRPC", "WNLI"]) == []


def test_interpolate_along_a_trajectory():
    pts = [(5.0, 6.0), (4.0, 5.0), (3.0, 3.0)]
    assert report.interpolate(pts, 3.5) == pytest.approx(4.0)
    assert report.interpolate(pts, 5.0) == pytest.approx(6.0)
    assert report.interpolate(pts, 2.0) is None


def test_recipe_overrides_and_defaults():
    name, rc = ex.load("tiny", ["glue.seeds=4,5", "ablations.positions=it,A", "pretrain.train.max_steps=12",
                                "align.factor=3", "glue.include_aligned=false", "trend.every=4"])
    assert name == "tiny" and rc["glue"]["seeds"] == [4, 5] and rc["ablations"]["positions"] == ["TI", "A"]
    assert rc["_steps"] == 12 and rc["align"]["factor"] == 3.0 and rc["glue"]["include_aligned"] is False
    assert ex.trend_steps(rc) == [4, 8, 12]
    assert "train.max_steps=12" in ex._trainer_overrides(rc["pretrain"])


@pytest.mark.parametrize("override, message", [
    ("glu.seeds=1", "unknown recipe key 'glu.seeds'; did you mean 'glue.seeds' or 'trend.seeds'?"),
    ("glue.seeds.x=1", "recipe key 'glue.seeds' is a value, not a section"),
    ("trend.seeds=1,-2", "trend.seeds must be >= 0, got -2"),
    ("glue.seeds=-1", "glue.max_*_examples and seeds must be >= 0"),
    ("glue=1", "recipe key 'glue' is a section; set one of its keys"),
    ("glue.per_task.SST-2.epochs=zero", "recipe key 'glue.per_task.SST-2.epochs' expects int, got 'zero'"),
    ("glue.per_task.SST-2.lr=1", "unknown recipe key 'glue.per_task.SST-2.lr'; did you mean"),
    ("glue.sedes=1", "unknown recipe key 'glue.sedes'; did you mean 'glue.seeds'?"),
    ("glue.seeds=one", "recipe key 'glue.seeds' expects a list of int"),
    ("ranks=0", "ranks and jobs must be >= 1"),
    ("align.factor=0.5", "align.factor must be >= 1"),
    ("ablations.positions=TX", "'TX' is not a new non-empty subset"),
    ("glue.tasks=MRPC,FOO", "unknown GLUE task 'FOO'"),
    ("pretrain.train.max_stepz=3", "did you mean 'train.max_steps'?"),
    ("pretrain.run_dir=x", "pretrain.run_dir is set by the pipeline"),
    ("trend.every=100000", "trend.every must be in [1, pre-training steps="),
    ("ds_config=nope.json", "ds_config nope.json does not exist"),
])
def test_bad_recipe_values_fail_with_one_line(override, message, capsys):
    with pytest.raises(SystemExit) as err:
        ex.main(["tiny", override, "--dry-run"])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines



def test_missing_data_stops_the_experiment_before_any_unit(tmp_path, monkeypatch, capsys):
    """Run from a directory without ../shared, the trainer would fall back to bundled text and skip
    the eval corpora: an experiment refuses instead, naming the key, the path and the cwd."""
    monkeypatch.chdir(tmp_path)
    corpus, glue = tmp_path / "corpus", tmp_path / "glue"
    corpus.mkdir()
    glue.mkdir()
    present = [f"pretrain.data.corpus={corpus}", "pretrain.data.vocab=wordpiece:512",
               f"pretrain.data.eval_corpora=wt={corpus}", f"glue.dir={glue}"]
    cases = [
        ([], "--steps", "teacher", "pretrain.data.corpus ../shared/data/wikipedia-en-2015 not found"),
        (present[1:], "--steps", "pretrain", "pretrain.data.corpus ../shared/data/wikipedia-en-2015 not found"),
        (present[:1] + present[2:], "--steps", "ood", "pretrain.data.vocab ../shared/data/vocab/"),
        (present[:2] + present[3:], "--steps", "analyze", "pretrain.data.eval_corpora (wikitext2)"),
        (present + ["teacher.data.corpus=./nope"], "--steps", "teacher", "teacher.data.corpus ./nope not found"),
        (present[:3] + ["glue.dir=/nope/glue"], "--steps", "glue", "glue.dir /nope/glue not found"),
    ]
    for overrides, flag, steps, message in cases:
        with pytest.raises(SystemExit) as err:
            ex.main(["tiny", "--out", str(tmp_path / "out"), flag, steps, *overrides])
        assert err.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and f"(from {tmp_path})" in lines[0], (steps, lines)
        assert "never falls back" in lines[0]
        assert not (tmp_path / "out").exists(), "nothing runs before the data is checked"
    # every path present passes; no step, nothing to read
    ex.check_data(ex.load("tiny", present)[1], list(ex.STEPS))
    ex.check_data(ex.load("tiny")[1], [])

def test_unknown_recipe_and_step(capsys):
    for argv in (["nope"], ["tiny", "--steps", "teacher,bogus"]):
        with pytest.raises(SystemExit) as err:
            ex.main(argv)
        assert err.value.code == 2
    assert "neither a file nor one of: " in capsys.readouterr().err


def test_packaged_recipes_are_valid():
    for recipe in sorted(ex.RECIPES.glob("*.yaml")):
        _, rc = ex.load(str(recipe))
        assert rc["_steps"] >= rc["trend"]["every"]
    assert {"tiny", "small"} <= {p.stem for p in ex.RECIPES.glob("*.yaml")}



FAKE_TRAINER = """
import json, os, sys, time
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
mode = sys.argv[sys.argv.index("--mode") + 1]
run = Path(args["run_dir"])
run.mkdir(parents=True, exist_ok=True)
start = time.time()
if mode == os.environ.get("FAKE_FAIL_MODE"):
    sys.exit(1)
time.sleep(float(os.environ["FAKE_SECONDS_" + mode]))
(run / "seen.json").write_text(json.dumps({"threads": os.environ.get("OMP_NUM_THREADS"), "start": start,
                                            "end": time.time(), "teacher": args.get("teacher.path")}))
(run / "summary.json").write_text(json.dumps({"steps": int(args["train.max_steps"]), "eval": {}}))
"""


@pytest.fixture
def fake_pipeline(tmp_path, monkeypatch):
    """A Pipeline of the tiny recipe whose trainer is a script that records its threads and times."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(ex.Pipeline, "trainer_command", lambda self, args: [sys.executable, str(script), *args])
    teacher = tmp_path / "out" / "teacher" / "run" / "export"
    teacher.mkdir(parents=True)
    (teacher / "config.json").write_text("{}")

    def make(jobs: int, fail: str = "", seconds: dict | None = None) -> ex.Pipeline:
        for mode, s in (seconds or {"moe": 1.5, "tcd": 1.5}).items():
            monkeypatch.setenv(f"FAKE_SECONDS_{mode}", str(s))
        monkeypatch.setenv("FAKE_FAIL_MODE", fail)
        _, rc = ex.load("tiny", [f"pretrain_jobs={jobs}", "threads=2"])
        return ex.Pipeline("tiny", rc, tmp_path / "out")
    return make


def _seen(p: ex.Pipeline, run: str) -> dict:
    return json.loads((p.out / "pretrain" / run / "seen.json").read_text())


def test_pretrain_jobs_2_trains_baseline_and_student_side_by_side_on_half_the_threads(fake_pipeline):
    p = fake_pipeline(2)
    p.step = "pretrain"
    ex.step_pretrain(p)
    base, tcd = _seen(p, "baseline"), _seen(p, "tcd")
    assert max(base["start"], tcd["start"]) < min(base["end"], tcd["end"]), "the two runs overlap"
    assert base["threads"] == tcd["threads"] == "1"
    assert tcd["teacher"] == str((p.out / "teacher" / "run").resolve()) and base["teacher"] is None
    for run in ("baseline", "tcd"):
        assert (p.out / "pretrain" / run / "done.json").is_file()
        assert f"--mode {'moe' if run == 'baseline' else 'tcd'}" in (p.out / "pretrain" / f"{run}.log").read_text()


def test_pretrain_jobs_1_trains_one_after_the_other_on_all_threads(fake_pipeline):
    p = fake_pipeline(1, seconds={"moe": 0.3, "tcd": 0.3})
    p.step = "pretrain"
    ex.step_pretrain(p)
    base, tcd = _seen(p, "baseline"), _seen(p, "tcd")
    assert base["end"] <= tcd["start"] and base["threads"] == tcd["threads"] == "2"


def test_a_failed_run_side_by_side_stops_the_other_and_fails_the_step(fake_pipeline):
    p = fake_pipeline(2, fail="tcd", seconds={"moe": 60, "tcd": 0})
    p.step = "pretrain"
    start = time.perf_counter()
    with pytest.raises(ex.ExperimentError, match="pretrain/tcd failed"):
        ex.step_pretrain(p)
    assert time.perf_counter() - start < 30, "the baseline was stopped, not waited for"
    assert not p.training and not (p.out / "pretrain" / "baseline" / "done.json").exists()
    assert not (p.out / "pretrain" / "baseline" / "seen.json").exists()


def test_a_run_that_stopped_at_its_target_is_finished(fake_pipeline):
    """train.stop_at_val_loss ends a run before max_steps, complete: re-run after the trainer finished
    (the pipeline stopped before writing done.json), the unit is done without launching it again."""
    p = fake_pipeline(1, seconds={"moe": 0})
    p.step = "align"
    run = p.out / "align" / "baseline_long"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"steps": 4, "target_reached": 4, "interrupted": False}))
    done = p.train(run, "moe", ["train.max_steps=9", "train.eval_every=2", "train.stop_at_val_loss=4.5"])
    assert done["steps"] == 4 and (run / "done.json").is_file()
    assert not (p.out / "align" / "train.log").exists(), "the trainer was not launched again"

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_the_experiment_with_its_trainer_and_records_the_invocation(signum, tmp_path, monkeypatch,
                                                                                  capsys):
    """`kill <pipeline pid>` (or a closed terminal) used to end the pipeline at once and leave its
    trainer running on, orphaned, into a run dir that a re-run would train in too. Now the pipeline
    stops its trainer (which saves a checkpoint on SIGTERM), records the invocation and exits 128 + N."""
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    script, pid_file = tmp_path / "slow_trainer.py", tmp_path / "trainer.pid"
    script.write_text(f"import os, pathlib, time\npathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
                      "time.sleep(30)\n")
    monkeypatch.setattr(ex.Pipeline, "trainer_command", lambda self, args: [sys.executable, str(script)])
    unhandled = []

    def callers_handler(*args):  # without the pipeline's own: the signal is recorded, not fatal
        unhandled.append(args)

    before = signal.signal(signum, callers_handler)
    out = tmp_path / "out"

    def send():
        while not pid_file.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signum)

    threading.Thread(target=send, daemon=True).start()
    start = time.perf_counter()
    try:
        with pytest.raises(SystemExit) as err:
            ex.main(["tiny", "--out", str(out), "--steps", "teacher", f"pretrain.data.corpus={corpus}",
                     "pretrain.data.vocab=wordpiece:512", f"pretrain.data.eval_corpora=wt={corpus}"])
        assert not unhandled, "the pipeline handled the signal"
    finally:
        restored = signal.getsignal(signum)
        signal.signal(signum, before)
    assert err.value.code == 128 + signum
    assert time.perf_counter() - start < 20, "the trainer was stopped, not waited for"
    trainer = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(trainer, 0)  # stopped and reaped: no orphan trains on
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"error: stopped by {signal.Signals(signum).name} in step teacher")
    assert "re-run the same command to resume" in message
    record = json.loads((out / "invocations.jsonl").read_text().splitlines()[-1])
    assert record["stopped"] == signal.Signals(signum).name and record["stopped_in"] == "teacher"
    assert record["ran"] == [] and record["steps"]["teacher"] > 0
    assert not (out / "teacher" / "run" / "done.json").exists()
    assert restored is callers_handler, "the caller's handler is restored"


def test_wall_time_counts_the_invocations_that_ran_or_were_stopped_in_a_step(tmp_path):
    """A training stopped by a signal and resumed later finishes in the second invocation; the step's
    wall time is both invocations', not the last one's only. An invocation that skipped the step adds nothing."""
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "done.json").write_text(json.dumps({"units": 1, "seconds": 700}))
    inv = [{"steps": {"teacher": 600.0}, "ran": [], "stopped": "SIGTERM", "stopped_in": "teacher"},
           {"steps": {"teacher": 100.0, "pretrain": 5.0}, "ran": ["teacher/run"]},
           {"steps": {"teacher": 0.01}, "ran": []}]
    c = report._Report(tmp_path, ex.load("tiny")[1], "cmd", {}, inv=inv)
    lines = "\n".join(report._wall_time_section(c)).splitlines()
    row = next(line for line in lines if line.startswith("| 1. teacher"))
    assert row.split("|")[2:5] == [" 1 ", " 11m40s ", " 11m40s "], row


def test_teacher_from_copies_a_finished_teacher_with_its_glue_and_refuses_one_of_other_settings(tmp_path,
                                                                                                 monkeypatch):
    """A replicate with another pre-training seed keeps the teacher: `teacher_from` copies the other
    out dir's finished teacher and its finished GLUE sweeps, and step teacher then trains nothing. A
    teacher trained with other settings (the seed it took from pretrain.seed) is refused, naming the
    key, and nothing is copied."""
    from tcd_ds.experiment_layout import run_dirs

    _, rc = ex.load("tiny")
    src = ex.Pipeline("tiny", rc, tmp_path / "a")
    teacher = run_dirs(src.out, rc)["teacher"]
    _, cfg, fingerprint = src.training_spec(teacher, "vanilla", [], teacher=True)
    ex.write_json(teacher / "done.json", {"unit": "teacher/run", "fingerprint": src.portable(fingerprint)})
    ex.write_json(teacher / "export" / "config.json", {})
    ex.write_json(src.out / "glue" / "teacher" / "MRPC" / "done.json", {"task": "MRPC"})
    (src.out / "glue" / "teacher" / "CoLA").mkdir()  # unfinished: left behind
    monkeypatch.setattr(ex.Pipeline, "_launch", lambda *a, **k: pytest.fail("trained a teacher"))

    other = cfg.seed + 1
    _, mismatched = ex.load("tiny", [f"pretrain.seed={other}", f"teacher_from={src.out}"])
    p = ex.Pipeline("tiny", mismatched, tmp_path / "b")
    changed = rf"trained with other settings \(config\.seed: {cfg.seed} -> {other}\)"
    with pytest.raises(ex.ExperimentError, match=changed):
        ex.step_teacher(p)
    assert not (tmp_path / "b").exists()

    _, pinned = ex.load("tiny", [f"pretrain.seed={other}", f"teacher.seed={cfg.seed}", f"teacher_from={src.out}"])
    p = ex.Pipeline("tiny", pinned, tmp_path / "b")
    ex.step_teacher(p)
    here = run_dirs(p.out, pinned)["teacher"]
    assert (here / "export" / "config.json").is_file() and p.skipped == ["teacher/run"]
    assert sorted(x.name for x in (p.out / "glue" / "teacher").iterdir() if x.is_dir()) == ["MRPC"]  # + its .lock
    ex.step_teacher(p)  # a re-run: the copy is there, nothing copied again
    assert p.skipped == ["teacher/run", "teacher/run"]


def test_findings_read_each_glue_average_comparison_off_its_interval(tmp_path):
    """The findings name the student's GLUE-average differences with their intervals and say which
    exclude 0; no comparison, no claim about intervals."""
    rc = ex.load("tiny")[1]
    comps = [{"a": "tcd", "b": "baseline", "task": "GLUE avg", "diff": 1.95, "ci95": [1.14, 2.84]},
             {"a": "tcd", "b": "teacher", "task": "GLUE avg", "diff": -0.22, "ci95": [-0.98, 0.54]},
             {"a": "tcd", "b": "teacher", "task": "CoLA", "diff": -1.2, "ci95": [-3.4, 1.1]},
             {"a": "teacher", "b": "random_init", "task": "GLUE avg", "diff": 3.4, "ci95": [2.2, 4.7]}]
    c = report._Report(tmp_path, rc, "cmd", {}, comparisons=comps, findings=["OOD: ..."])
    lines = report._findings_section(c)
    bullets = [line for line in lines if line.startswith("- ")]
    assert bullets == [
        f"- GLUE avg, {report.LABELS['tcd']} − {report.LABELS['baseline']}: +1.9 [+1.1, +2.8] points: "
        "the interval excludes 0.",
        f"- GLUE avg, {report.LABELS['tcd']} − {report.LABELS['teacher']}: -0.2 [-1.0, +0.5] points: "
        "the interval contains 0, no evidence either way.",
        "- OOD: ..."]
    assert "fine-tuning seeds only" in lines[-1]
    bare = report._findings_section(report._Report(tmp_path, rc, "cmd", {}))
    assert bare == [report.HEADINGS[10], "", "- (nothing to compare yet)"]


# --- end to end ---------------------------------------------------------------------------------

def _overrides(d: Path, cache: Path) -> list[str]:
    """The tiny recipe cut to a few steps, one ablation, few fine-tuning examples; QNLI is in the
    task list to exercise the skip (it has no train split here)."""
    return [f"pretrain.data.corpus={d / 'wikipedia-en-2015'}",
            f"pretrain.data.vocab={d / 'vocab' / 'bert-base-uncased-vocab.txt'}",
            f"pretrain.data.eval_corpora=wikitext2={d / 'wikitext-2' / 'wiki.test.raw'},"
            f"gutenberg={d / 'gutenberg-novels'}",
            f"pretrain.data.cache_dir={cache}", "pretrain.data.max_documents=40", "pretrain.data.eval_max_sequences=16",
            "pretrain.model.moe.num_experts=8", "pretrain.train.max_steps=6", "teacher.train.max_steps=6",
            "pretrain.train.eval_every=3", "pretrain.train.save_every=3", "pretrain.train.eval_batches=1",
            "pretrain.train.log_every=1", "align.every=3", "trend.every=3", "ablations.positions=TI",
            f"glue.dir={d / 'glue'}", "glue.tasks=MRPC,WNLI,QNLI", "glue.seeds=1,2", "glue.max_train_examples=32",
            "glue.max_eval_examples=32", "threads=1", "jobs=2"]


def _run(out: Path, args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tcd_ds.experiments", "tiny", "--out", str(out), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    return proc, time.perf_counter() - start


@pytest.fixture(scope="module")
def pipeline(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    args = _overrides(shared_data, root / "cache")
    proc, _ = _run(root / "out", args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return root / "out", args, proc.stdout


@pytest.mark.slow
@pytest.mark.multiproc
def test_pipeline_writes_every_table_and_plot(pipeline):
    out, _args, stdout = pipeline
    text = (out / "report.md").read_text()
    for heading in report.HEADINGS:
        assert heading + "\n" in text, heading
    for name in report.PLOTS:
        png = out / "plots" / name
        assert png.is_file() and png.stat().st_size > 1000 and png.read_bytes()[:8] == PNG_MAGIC, name
        assert f"](plots/{name})" in text
    assert "python -m tcd_ds.experiments tiny --out" in text and "cpus (os.cpu_count)" in text
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # an odd backtick opens a code span it never closes
    assert not [line for line in prose.splitlines() if line.count("`") % 2], "unbalanced backticks"
    assert "QNLI skipped" in text and "| TI |" in text and "MoE baseline (perf-aligned)" in text
    for step in ex.STEPS:
        assert (out / step / "done.json").is_file(), step
        assert f"step {step}: finished in" in stdout
    assert (out / "teacher" / "train.log").stat().st_size > 0
    for run, mode in (("baseline", "moe"), ("tcd", "tcd")):  # side by side (pretrain_jobs: 2), a log each
        assert f"--mode {mode}" in (out / "pretrain" / f"{run}.log").read_text()
    aligned = json.loads((out / "align" / "aligned" / "done.json").read_text())
    assert aligned["step"] in (3, 6, 9, 12) and (out / "align" / "aligned" / "export" / "config.json").is_file()
    _, rc = ex.load("tiny", _args)
    for variant in ("baseline", "tcd"):
        results = json.loads((out / "trend" / variant / f"step_{3:08d}" / "results.json").read_text())
        assert results["task"] == "MRPC" and len(results["glue_score"]["per_seed"]) == 2
        # the final step's point is step glue's fine-tuning of the same weights: not run twice
        assert not (out / "trend" / variant / f"step_{6:08d}").exists()
        glue = json.loads((out / "glue" / variant / "MRPC" / "results.json").read_text())
        assert report.trend_scores(out, rc, variant, 6) == glue["glue_score"]["per_seed"] != []
    for variant in ("teacher", "baseline", "baseline_aligned", "tcd"):
        assert {p.name for p in (out / "glue" / variant).iterdir()} == {"MRPC", "WNLI"}


@pytest.mark.slow
@pytest.mark.multiproc
def test_rerun_skips_every_unit(pipeline):
    out, args, _ = pipeline
    markers = {p: p.stat().st_mtime_ns for p in out.rglob("done.json") if p.parent.name not in ex.STEPS}
    summaries = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    proc, seconds = _run(out, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not re.search(r"^\[\S+\]   \S+: start$", proc.stdout, re.MULTILINE)  # no unit started
    assert "(0 units run, " in proc.stdout and len(markers) >= 20
    assert {p: p.stat().st_mtime_ns for p in markers} == markers
    assert {p: p.stat().st_mtime_ns for p in summaries} == summaries
    assert seconds < 60


@pytest.mark.slow
@pytest.mark.multiproc
def test_rerun_resumes_an_unfinished_training(pipeline):
    """A training cut off after its step-3 checkpoint resumes there; its fine-tuning is reused."""
    out, args, _ = pipeline
    run = out / "ablations" / "TI" / "run"
    for name in ("done.json", "summary.json"):
        (run / name).unlink()
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    proc, _ = _run(out, args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "ablations/TI/run: start" in proc.stdout and "(1 units run, " in proc.stdout
    assert "resume: from" in (out / "ablations" / "train.log").read_text().split("=====")[-1]
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


@pytest.mark.slow
@pytest.mark.multiproc
def test_results_json_holds_models_comparisons_and_the_transfer_diagnostic(pipeline):
    out, _, _ = pipeline
    res = json.loads((out / "results.json").read_text())
    assert res["command"].startswith("python -m tcd_ds.experiments tiny")
    models = res["models"]
    assert {k: m["mode"] for k, m in models.items()} == {
        "teacher": "vanilla", "baseline": "moe", "baseline_aligned": "moe", "tcd": "tcd", "random_init": "random"}
    for key, m in models.items():
        assert m["hidden_size"] == 64 and set(m["glue"]) == {"MRPC", "WNLI"}
        assert all(len(v) == 2 and all(0.0 <= x <= 100.0 for x in v) for v in m["glue"].values())
        assert isinstance(m["val_mlm_loss"], float) and isinstance(m["gutenberg_mlm_loss"], float)
        assert 0.0 <= m["val_mlm_accuracy"] <= 1.0
    assert models["random_init"]["steps"] == 0 and models["random_init"]["tokens"] == 0
    assert models["tcd"]["tokens"] > 0 and models["baseline_aligned"]["steps"] in (3, 6, 9, 12)
    # the random-init model is scored by the same evaluation: near log(vocab), far from the trained ones
    assert models["random_init"]["val_mlm_loss"] > models["teacher"]["val_mlm_loss"]
    # the scores are the fine-tuning results' own, in percent
    mrpc = json.loads((out / "glue" / "tcd" / "MRPC" / "results.json").read_text())
    assert models["tcd"]["glue"]["MRPC"] == pytest.approx([100 * x for x in mrpc["glue_score"]["per_seed"]])
    pairs = {(c["a"], c["b"], c["task"]) for c in res["comparisons"]}
    for a, b in (("tcd", "baseline"), ("tcd", "baseline_aligned"), ("tcd", "teacher"), ("teacher", "random_init")):
        assert {(a, b, t) for t in ("MRPC", "WNLI", "GLUE avg")} <= pairs
    for c in res["comparisons"]:
        xa = models[c["a"]]["glue_avg" if c["task"] == "GLUE avg" else "glue"]
        xb = models[c["b"]]["glue_avg" if c["task"] == "GLUE avg" else "glue"]
        xa, xb = (xa, xb) if c["task"] == "GLUE avg" else (xa[c["task"]], xb[c["task"]])
        assert c["diff"] == pytest.approx(sum(xa) / len(xa) - sum(xb) / len(xb))
        assert c["ci95"][0] <= c["diff"] + 1e-9 and c["diff"] - 1e-9 <= c["ci95"][1]
    assert set(res["analysis"]) >= {"baseline", "tcd"} and set(res["analysis"]["tcd"]) == {"wikitext2", "gutenberg"}
    assert set(res["analysis"]["tcd"]["wikitext2"]) == {"T", "I", "A"}
    text = (out / "report.md").read_text()
    assert "## Relations to the teacher" in text and "## Comparisons" in text and "Random init" in text


def _glue_pipeline(rc, tmp_path, monkeypatch) -> tuple[ex.Pipeline, list]:
    """A pipeline at step glue whose fine-tuning processes are recorded (argv, env), not run."""
    p = ex.Pipeline("tiny", rc, tmp_path)
    p.step = "glue"
    seen = []

    class FakeProc:
        returncode = 0

        def __init__(self, argv, stdout, stderr, env):
            seen.append((argv, env))

        def poll(self):
            return 0

    monkeypatch.setattr(ex.subprocess, "Popen", FakeProc)
    return p, seen


def test_fine_tuning_processes_get_glue_threads_and_trainers_keep_threads(tmp_path, monkeypatch):
    _, rc = ex.load("tiny", ["threads=2", "glue.threads=1", "jobs=2"])
    p, seen = _glue_pipeline(rc, tmp_path, monkeypatch)
    p.finetune(tmp_path / "model", "MRPC", tmp_path / "ft")
    argv, env = seen[0]
    assert argv[argv.index("--threads") + 1] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert p.env()["OMP_NUM_THREADS"] == "2"  # trainer ranks
    _, rc = ex.load("tiny", ["threads=2"])
    assert ex.Pipeline("tiny", rc, tmp_path).finetune_threads() == 2  # 0: the experiment's threads
    with pytest.raises(ex.ExperimentError, match="glue.threads >= 0"):
        ex.load("tiny", ["glue.threads=-1"])


def test_per_task_lrs_epochs_and_batch_size_reach_the_fine_tuning_command(tmp_path, monkeypatch):
    _, rc = ex.load("tiny", ["glue.batch_size=32", "glue.epochs=3",
                             "glue.per_task=SST-2:lrs=3e-4,1e-4,epochs=1,batch_size=128"])
    assert rc["glue"]["per_task"] == {"SST-2": {"lrs": [3e-4, 1e-4], "epochs": 1, "batch_size": 128}}
    p, seen = _glue_pipeline(rc, tmp_path, monkeypatch)
    for task in ("SST-2", "MRPC"):
        p.finetune(tmp_path / "model", task, tmp_path / task)
    flag = lambda argv, name: argv[argv.index(name) + 1]  # noqa: E731
    assert [(flag(a, "--lrs"), flag(a, "--epochs"), flag(a, "--batch-size")) for a, _ in seen] == \
        [("0.0003,0.0001", "1", "128"), (",".join(f"{x:g}" for x in rc["glue"]["lrs"]), "3", "32")]
    for bad in ("SST-2:batch_size=0", "SST-2:batch_size=two"):
        with pytest.raises(ex.ExperimentError, match="batch_size"):
            ex.load("tiny", [f"glue.per_task={bad}"])


def test_a_trainer_key_added_at_its_default_keeps_finished_units_and_a_change_is_named(tmp_path):
    from tcd_ds.config import Config, to_dict

    now = {"ranks": 1, "config": to_dict(Config()), "ds_config": {"zero": 2}}
    recorded = copy.deepcopy(now)
    del recorded["config"]["train"]["fused_optimizer"]  # a run finished before this key existed
    assert ex.changed_settings(recorded, now) == []
    assert ex.changed_settings(now, now) == [] and ex.changed_settings({"argv": [1]}, {"argv": [1]}) == []
    now["config"]["train"]["fused_optimizer"] = False  # not the default: the run would differ
    assert ex.changed_settings(recorded, now) == ["config.train.fused_optimizer: (absent) -> False"]
    recorded["config"]["train"]["fused_optimizer"] = True
    assert ex.changed_settings(recorded, now) == ["config.train.fused_optimizer: True -> False"]
    del now["config"]["train"]["lr"]  # a key that went away counts
    assert f"config.train.lr: {Config().train.lr} -> (absent)" in ex.changed_settings(recorded, now)

    p = ex.Pipeline("tiny", ex.load("tiny")[1], tmp_path)
    unit = tmp_path / "u"
    p.unit(unit, {"config": {"train": {"lr": 1.0}}}, lambda: {})
    assert p.unit(unit, {"config": {"train": {"lr": 1.0}}}, lambda: pytest.fail("re-ran"))["unit"] == "u"
    with pytest.raises(ex.ExperimentError, match=r"other settings \(config.train.lr: 1.0 -> 2.0\)"):
        p.unit(unit, {"config": {"train": {"lr": 2.0}}}, lambda: {})


def test_results_name_an_moe_exports_real_number_of_experts():
    """results.json's `num_experts` read the export's config.json; ours keep the MoE settings under
    `tcd_moe` (every MoE model was reported with 0 experts before)."""
    from tcd_ds.config import build_config
    from tcd_ds.model.hf import config_to_hf

    moe = config_to_hf(build_config("tiny", ["mode=moe", "model.moe.num_experts=8"]).student_model())
    dense = config_to_hf(build_config("tiny", ["mode=vanilla"]).student_model())
    assert report.export_num_experts(moe) == 8 and report.export_num_experts(dense) == 0


def test_reports_name_no_machine_paths(tmp_path, monkeypatch):
    """The report's 'run from' line and the recorded command named the machine's absolute paths."""
    from tcd_ds.resources import ROOT

    monkeypatch.chdir(ROOT)
    assert report._where() == "the repo root"
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "exp").mkdir()
    monkeypatch.chdir(tmp_path / "exp")
    assert report._where() == "`~/exp`"
