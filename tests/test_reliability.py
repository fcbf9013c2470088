"""Faults (kill -9, signals, non-finite losses, disk full, cut-off checkpoints) and bad input.

Every test asserts the exact outcome: exit status, message text, resumed step, identical losses,
the previous checkpoint left intact."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tcd_ds.config import ModelConfig
from tcd_ds.model.bert import BertForMaskedLM
from tcd_ds.model.hf import config_to_hf, save_pretrained

from trainer_utils import REPO, kill_group, launch, quick, rank_pids, start, wait_for

BASE = ["--config", "tiny", "--deepspeed_config", "ds_configs/cpu_zero2.json"]
EP2 = ["model.moe.backend=deepspeed", "model.moe.ep_size=2", "model.moe.num_experts=4", "model.moe.jitter=0.1",
       "model.moe.capacity_factor=1.0"]
SMALL_MOE = ["model.moe.num_experts=2"]

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]  # every test runs the trainer (or finetune) in processes


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token_cache")


def history(run: Path) -> dict[int, dict]:
    return {h["step"]: h for h in json.loads((run / "summary.json").read_text())["history"]}


def logged_steps(run: Path) -> int:
    f = run / "metrics.jsonl"
    return sum('"kind": "train"' in line for line in f.read_text().splitlines()) if f.is_file() else 0


def test_kill_one_rank_then_resume_matches_uninterrupted_run(shared_data, cache, tmp_path):
    straight = tmp_path / "straight"
    proc = launch(BASE + ["--mode", "moe"] + quick(shared_data, cache, straight, 8, *EP2), tmp_path / "a.txt")
    assert proc.returncode == 0, (tmp_path / "a.txt").read_text()[-3000:]

    resumed = tmp_path / "resumed"
    args = BASE + ["--mode", "moe"] + quick(shared_data, cache, resumed, 8, *EP2, "train.save_every=4",
                                            "train.collective_timeout_s=30")
    log = tmp_path / "b1.txt"
    launcher = start(args, log)
    try:
        wait_for(lambda: (resumed / "checkpoints" / "step_00000004" / "complete.json").is_file(), launcher, log,
                 "the checkpoint of step 4")
        pids = rank_pids(launcher)
        assert sorted(pids) == [0, 1]
        killed_at = time.time()
        os.kill(pids[1], signal.SIGKILL)  # one rank dies; the other must not hang on a collective
        launcher.wait(timeout=120)
        assert time.time() - killed_at < 60
        assert launcher.returncode != 0
        import psutil

        assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE
    finally:
        kill_group(launcher)

    proc = launch(args, tmp_path / "b2.txt")
    text = (tmp_path / "b2.txt").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "resume: from" in text and "(step 4)" in text, text[-3000:]
    a, b = history(straight), history(resumed)  # metrics.jsonl: steps 5-8 from the resumed process
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert b[step]["samples_rank0"] == a[step]["samples_rank0"], step
        for key in ("loss", "mlm", "aux", "balance", "dropped"):
            assert abs(b[step][key] - a[step][key]) <= 1e-6, (step, key, a[step][key], b[step][key])


def test_usr1_on_every_rank_saves_and_exits_for_requeue(shared_data, cache, tmp_path):
    run = tmp_path / "run"
    args = BASE + ["--mode", "moe"] + quick(shared_data, cache, run, 12, *EP2)
    log = tmp_path / "log.txt"
    launcher = start(args, log)
    try:
        wait_for(lambda: logged_steps(run) >= 3, launcher, log, "step 3")
        for pid in rank_pids(launcher).values():  # what Slurm does: signal every task of the step
            os.kill(pid, signal.SIGUSR1)
        launcher.wait(timeout=120)
    finally:
        kill_group(launcher)
    text = log.read_text()
    assert launcher.returncode == 85, text[-3000:]
    saved = int(text.split("signal 10: saved step ")[1].split(";")[0])
    assert 3 <= saved < 12
    tag = f"step_{saved:08d}"
    assert (run / "checkpoints" / "latest").read_text().strip() == tag
    assert (run / "checkpoints" / tag / "complete.json").is_file()
    proc = launch(args, tmp_path / "again.txt")  # the requeued job
    again = (tmp_path / "again.txt").read_text()
    assert proc.returncode == 0, again[-3000:]
    assert f"(step {saved})" in again
    assert json.loads((run / "summary.json").read_text())["steps"] == 12


def test_sigterm_saves_and_exits_for_requeue_single_process(shared_data, cache, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "log.txt"
    proc = start(BASE + ["--mode", "moe"] + quick(shared_data, cache, run, 40, *SMALL_MOE), log, ranks=1)
    try:
        wait_for(lambda: logged_steps(run) >= 2, proc, log, "step 2")
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        kill_group(proc)
    text = log.read_text()
    assert proc.returncode == 85, text[-2000:]
    saved = int(text.split(f"signal {int(signal.SIGTERM)}: saved step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"step_{saved:08d}" / "complete.json").is_file()


def read_scalars(tb_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}




def test_nonfinite_steps_are_skipped_then_the_run_stops(shared_data, cache, tiny_teacher, tmp_path):
    run = tmp_path / "run"
    args = BASE + ["--mode", "tcd"] + quick(shared_data, cache, run, 10, *SMALL_MOE, f"teacher.path={tiny_teacher}",
                                            "train.max_nonfinite_steps=2", "train.save_every=1",
                                            "train.keep_checkpoints=10")
    # step 2: NaN MLM loss (skipped, then recovered); steps 4 and 5: NaN relation loss T -> stop at 5
    proc = launch(args, tmp_path / "log.txt", ranks=1, faults="2:mlm,4:T,5:T")
    text = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 3, text[-3000:]
    assert "step 2: non-finite MLM: step skipped (1 in a row)" in text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors == [f"error: stopped at step 5: 2 steps in a row had non-finite T "
                      f"(train.max_nonfinite_steps=2); the last complete checkpoint is under {run / 'checkpoints'}"]
    assert read_scalars(run / "tensorboard")["train/skipped_steps"] == [1.0, 2.0, 3.0]
    # a skipped step leaves the weights exactly as they were: checkpoints 1 and 2 hold the same model
    a = torch.load(run / "checkpoints" / "step_00000001" / "mp_rank_00_model_states.pt", weights_only=False)
    b = torch.load(run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt", weights_only=False)
    assert all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])


def test_nonfinite_gradients_are_caught_too(shared_data, cache, tmp_path):
    run = tmp_path / "run"
    args = BASE + ["--mode", "moe"] + quick(shared_data, cache, run, 6, *SMALL_MOE, "train.max_nonfinite_steps=2")
    proc = launch(args, tmp_path / "log.txt", ranks=1, faults="3:grad,4:grad")
    text = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 3, text[-3000:]
    assert "error: stopped at step 4: 2 steps in a row had non-finite gradients" in text


def _checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_disk_full_while_saving_keeps_the_previous_checkpoint(shared_data, cache, tmp_path):
    probe = tmp_path / "probe"
    base = BASE + ["--mode", "moe"]
    proc = launch(base + quick(shared_data, cache, probe, 1, *SMALL_MOE), tmp_path / "probe.txt", ranks=1)
    assert proc.returncode == 0, (tmp_path / "probe.txt").read_text()[-2000:]
    size = _checkpoint_bytes(probe / "checkpoints" / "step_00000001")
    run = tmp_path / "run"
    mount = run / "checkpoints"
    mount.mkdir(parents=True)
    # a disk with room for one checkpoint and a half: the second save runs out of space
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs", str(mount)], check=True)
    try:
        proc = launch(base + quick(shared_data, cache, run, 6, *SMALL_MOE, "train.save_every=2"),
                      tmp_path / "log.txt", ranks=1)
        text = (tmp_path / "log.txt").read_text()
        assert proc.returncode == 2, text[-3000:]
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(
            f"error: cannot write the checkpoint of step 4 under {mount}: "), errors
        assert "MiB free there)" in errors[0]
        assert errors[0].endswith("the last complete checkpoint (step_00000002) is intact")
        assert (mount / "latest").read_text().strip() == "step_00000002"
        assert (mount / "step_00000002" / "complete.json").is_file()
        assert not (mount / "step_00000004" / "complete.json").exists()
        assert _checkpoint_bytes(mount / "step_00000002") == pytest.approx(size, rel=0.01)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_cut_off_checkpoints_are_skipped_and_only_k_are_kept(shared_data, cache, tmp_path):
    run = tmp_path / "run"
    args = BASE + ["--mode", "moe"] + quick(shared_data, cache, run, 5, *SMALL_MOE, "train.save_every=1",
                                            "train.keep_checkpoints=2")
    proc = launch(args, tmp_path / "a.txt", ranks=1)
    assert proc.returncode == 0, (tmp_path / "a.txt").read_text()[-2000:]
    ckpt = run / "checkpoints"
    assert sorted(d.name for d in ckpt.glob("step_*")) == ["step_00000004", "step_00000005"]
    # step 5 "cut off mid-write": its completion marker never made it and a file is truncated
    (ckpt / "step_00000005" / "complete.json").unlink()
    with open(ckpt / "step_00000005" / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(100)
    proc = launch(args[:-len(quick(shared_data, cache, run, 5))] + quick(
        shared_data, cache, run, 6, *SMALL_MOE, "train.save_every=1", "train.keep_checkpoints=2"),
        tmp_path / "b.txt", ranks=1)
    text = (tmp_path / "b.txt").read_text()
    assert proc.returncode == 0, text[-2000:]
    assert "resume: skipped step_00000005 (incomplete: no complete.json)" in text
    assert f"resume: from {ckpt / 'step_00000004'} (step 4)" in text


def test_resuming_with_a_changed_model_shape_is_refused(shared_data, cache, tmp_path):
    run = tmp_path / "run"
    args = BASE + ["--mode", "moe"] + quick(shared_data, cache, run, 1, *SMALL_MOE)
    assert launch(args, tmp_path / "a.txt", ranks=1).returncode == 0
    proc = subprocess.run([sys.executable, "-m", "tcd_ds.train", *args, "model.intermediate_size=128"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: cannot resume from {run / 'checkpoints' / 'step_00000001'}: the model "
                                   "shape changed (intermediate_size 256 -> 128); use another run_dir or --resume none")


def _fails(args: list[str], cwd: Path = REPO) -> str:
    proc = subprocess.run([sys.executable, "-m", "tcd_ds.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=180)
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return errors[0]


def test_bad_data_inputs_fail_with_one_line(shared_data, tmp_path):
    vocab = shared_data / "vocab" / "bert-base-uncased-vocab.txt"
    base = BASE + ["--mode", "moe", f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                   "data.eval_corpora=", "train.max_steps=1"]
    assert _fails(base + ["data.vocab=/nope/vocab.txt"]) == "error: tokenizer vocab file not found: /nope/vocab.txt"
    bad = tmp_path / "vocab.txt"
    bad.write_text("hello\nworld\n")
    assert _fails(base + [f"data.vocab={bad}"]).startswith(f"error: malformed vocab file {bad}: missing special tokens")
    assert _fails(base + ["data.corpus=/nope/corpus", f"data.vocab={vocab}"]) == \
        "error: corpus source not found: /nope/corpus"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    msg = _fails(base + [f"data.corpus={empty}", f"data.vocab={vocab}"])
    assert msg.startswith("error: data: ") and "empty" in msg.lower() or "no " in msg.lower(), msg
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.\n")
    msg = _fails(base + [f"data.corpus={short}", f"data.vocab={vocab}", "data.max_seq_len=64"])
    assert msg.startswith("error: data: ") and str(short) in msg, msg


def test_bad_teacher_fails_with_one_line(shared_data, tmp_path):
    # the student's vocab is the shared BERT vocab (30522), passed explicitly: without it the trainer would
    # fall back to its bundled vocab, whatever sits beside the repo
    base = BASE + ["--mode", "tcd", f"run_dir={tmp_path / 'run'}",
                   f"data.vocab={shared_data / 'vocab' / 'bert-base-uncased-vocab.txt'}",
                   f"data.corpus={shared_data / 'wikipedia-en-2015'}"]
    cfg = ModelConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256,
                      max_position=128)
    save_pretrained(BertForMaskedLM(cfg), cfg, tmp_path / "vocab1000")
    assert "teacher vocab_size 1000 != student vocab_size 30522" in _fails(base + [f"teacher.path={tmp_path / 'vocab1000'}"])
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    good = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256, max_position=128)
    (corrupt / "config.json").write_text(json.dumps(config_to_hf(good)))
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    msg = _fails(base + [f"teacher.path={corrupt}", "data.max_documents=5", "data.eval_corpora=",
                         f"data.cache_dir={tmp_path / 'cache'}"])
    assert msg.startswith(f"error: cannot read the weights in {corrupt}"), msg
    (corrupt / "config.json").write_text("{not json")
    assert _fails(base + [f"teacher.path={corrupt}"]) == \
        f"error: {corrupt / 'config.json'} is not valid JSON: Expecting property name enclosed in double quotes: " \
        "line 1 column 2 (char 1)"


def test_bad_parallel_and_config_inputs_fail_with_one_line(tmp_path):
    base = BASE + ["--mode", "moe", f"run_dir={tmp_path / 'run'}"]
    assert _fails(base + ["model.moe.backend=deepspeed", "model.moe.num_experts=6", "model.moe.ep_size=4"]) == \
        "error: model.moe.ep_size=4 must divide model.moe.num_experts=6"
    assert _fails(base + ["model.moe.backend=deepspeed", "model.moe.num_experts=8", "model.moe.ep_size=4"]) == \
        "error: model.moe.ep_size=4 does not divide the world size 1"
    assert _fails(base + ["model.moe.num_expert=8"]) == \
        "error: unknown config key 'model.moe.num_expert'; did you mean 'model.moe.num_experts'?"
    notjson = tmp_path / "ds.json"
    notjson.write_text("zero: 2")
    assert _fails(["--config", "tiny", "--mode", "moe", "--deepspeed_config", str(notjson)]).startswith(
        f"error: DeepSpeed config {notjson} is not valid JSON")


def test_glue_tsv_with_wrong_columns_fails_with_one_line(tmp_path):
    task = tmp_path / "glue" / "SST-2"
    task.mkdir(parents=True)
    (task / "train.tsv").write_text("sentence\tlabel\nfine movie\t1\n")
    (task / "dev.tsv").write_text("text\tscore\textra\nfine movie\t1\t0\n")
    model = tmp_path / "model"
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position=128)
    save_pretrained(BertForMaskedLM(cfg), cfg, model)
    proc = subprocess.run([sys.executable, "-m", "tcd_ds.finetune", "--model", str(model), "--task", "sst-2",
                           "--glue-dir", str(tmp_path / "glue"), "--epochs", "1", "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len([line for line in lines if line.startswith("error:")]) == 1 and "Traceback" not in proc.stderr
    assert str(task / "dev.tsv") in proc.stderr


HOLD_LOCK = """
import sys, time
from pathlib import Path
from tcd_ds.locks import RunDirLock
lock = RunDirLock.acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


def _hold(run: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_second_training_in_a_busy_run_dir_is_refused_and_a_dead_holder_leaves_no_lock(shared_data, cache,
                                                                                           tmp_path, ranks):
    """Two trainers in one run dir would resume from the same checkpoint and write over each other.
    While a live process holds the run dir, a trainer exits 2 with one line naming the holder and
    writes nothing there (with 2 ranks the launcher ends the other rank); once the holder is killed
    (SIGKILL: no clean-up of its own), the same command trains."""
    run = tmp_path / "run"
    args = BASE + ["--mode", "moe"] + quick(shared_data, cache, run, 1, *SMALL_MOE)
    holder = _hold(run)
    try:
        log = tmp_path / "busy.txt"
        start_s = time.time()
        proc = launch(args, log, ranks=ranks, timeout=180)
        text = log.read_text()
        assert proc.returncode != 0 and time.time() - start_s < 120, text[-3000:]
        errors = [line for line in text.splitlines() if "error: run dir" in line]
        assert errors and f"is in use by another training (pid {holder.pid} on " in errors[0], text[-3000:]
        assert sorted(p.name for p in run.iterdir()) == [".run.lock"], "nothing written in the busy run dir"
    finally:
        holder.kill()
        holder.wait()
    assert launch(args, tmp_path / "free.txt", ranks=ranks).returncode == 0, (tmp_path / "free.txt").read_text()[-3000:]
    assert (run / "summary.json").is_file()


def _comm_segments() -> set[Path]:
    from tcd_ds.dist import comm_segments

    return set(comm_segments())


def _mapped_comm_segments(pid: int) -> list[str]:
    """The DeepSpeed comm segments a process maps, as /proc/<pid>/maps names them ('... (deleted)'
    once unlinked)."""
    from tcd_ds.dist import SHM_SEGMENT

    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sorted({line.split(None, 5)[5] for line in lines if SHM_SEGMENT in line})


def test_a_two_rank_run_leaves_no_shared_memory_behind_even_when_killed(shared_data, cache, tmp_path):
    """DeepSpeed's CPU comm op maps a 66 MB /dev/shm segment per rank and never unlinks it: every
    2-rank run left 132 MB of RAM behind, until a day of runs filled /dev/shm (22 GB) and the test
    suite was killed for memory. Each rank now unlinks its own segment once all have mapped them:
    while the run trains both ranks map both segments, deleted, none is left to name, and a run
    killed by SIGKILL (no clean-up of its own) leaves none. A segment an earlier run left is named in
    one note."""
    from tcd_ds.dist import comm_segment

    left_earlier = comm_segment(0, "127.0.0.1", 1)  # port 1: no rendezvous ever uses it
    left_earlier.write_bytes(b"x")
    before = _comm_segments()
    run = tmp_path / "run"
    log = tmp_path / "log.txt"
    launcher = start(BASE + ["--mode", "vanilla"] + quick(shared_data, cache, run, 200), log)
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file() and '"kind": "train"' in (run / "metrics.jsonl").read_text(),
                 launcher, log, "the first step")
        pids = rank_pids(launcher)
        assert sorted(pids) == [0, 1]
        mapped = {rank: _mapped_comm_segments(pid) for rank, pid in pids.items()}
        named_while_training = _comm_segments() - before
    finally:
        kill_group(launcher)
        left_earlier.unlink()
    left = _comm_segments() - before
    notes = [line for line in log.read_text().splitlines() if "DeepSpeed comm segment(s) that earlier runs left" in line]
    assert len(notes) == 1 and notes[0].startswith("note: /dev/shm holds 1 DeepSpeed comm segment(s)"), notes
    for rank, names in mapped.items():
        assert len(names) == 2 and all(n.endswith(" (deleted)") for n in names), (rank, names)
    assert mapped[0] == mapped[1]
    assert not named_while_training, named_while_training
    assert not left, left
