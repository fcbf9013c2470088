"""Stopping on SIGUSR1 / SIGTERM at production scale (issue 15): a signal during start-up must not
kill a rank, and after a signal the loop saves at once (no eval first: the time left before the
job's limit is for the save). The trainer runs in a subprocess (one rank, tiny model) that sends
itself SIGUSR1 at a chosen moment, through a wrapper around one of `tcd_ds.train`'s functions."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_utils import REPO, quick

BASE = ["--config", "tiny", "--mode", "moe", "--deepspeed_config", "ds_configs/cpu_zero2.json"]

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]  # every test runs the trainer in a subprocess

# argv: WHEN N trainer-args...; sends SIGUSR1 to itself when the N-th call of the wrapped function starts
RUNNER = r"""
import os, signal, sys
import tcd_ds.train as t
when, n = sys.argv[1], int(sys.argv[2])
name = {"startup": "detect_layout", "step": "forward_loss"}[when]
real, calls = getattr(t, name), [0]
def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        print(f"test: SIGUSR1 at call {n} of {name}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)
    return real(*args, **kwargs)
setattr(t, name, wrapped)
t.main(sys.argv[3:])
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token_cache")


def run_signalled(when: str, n: int, args: list[str], log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as f:
        return subprocess.run([sys.executable, "-c", RUNNER, when, str(n), *args], cwd=REPO, stdout=f,
                              stderr=subprocess.STDOUT, timeout=400)


def test_usr1_during_startup_saves_instead_of_killing_the_rank(shared_data, cache, tmp_path):
    """The signal comes while main() is still setting up (before data, model, engine): the rank
    survives, runs one step, saves it and exits for requeue."""
    run = tmp_path / "run"
    proc = run_signalled("startup", 1, BASE + quick(shared_data, cache, run, 6, "model.moe.num_experts=2"),
                         tmp_path / "log.txt")
    text = (tmp_path / "log.txt").read_text()
    assert "test: SIGUSR1 at call 1 of detect_layout" in text, text[-3000:]
    assert proc.returncode == 85, (proc.returncode, text[-3000:])
    assert f"signal {int(signal.SIGUSR1)}: saved step 1;" in text, text[-3000:]
    assert (run / "checkpoints" / "step_00000001" / "complete.json").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"


def test_after_usr1_the_due_eval_is_skipped_and_the_step_saved_at_once(shared_data, cache, tmp_path):
    """SIGUSR1 during step 3, whose eval is due (eval_every=3): step 3 is saved with no eval before it."""
    run = tmp_path / "run"
    args = BASE + quick(shared_data, cache, run, 9, "model.moe.num_experts=2", "train.grad_accum=1",
                        "train.eval_every=3")
    proc = run_signalled("step", 3, args, tmp_path / "log.txt")
    text = (tmp_path / "log.txt").read_text()
    assert "test: SIGUSR1 at call 3 of forward_loss" in text, text[-3000:]
    assert proc.returncode == 85, (proc.returncode, text[-3000:])
    assert f"signal {int(signal.SIGUSR1)}: saved step 3;" in text, text[-3000:]
    assert (run / "checkpoints" / "step_00000003" / "complete.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert [r for r in records if r["kind"] == "eval"] == [], "an eval ran between the signal and the save"
    assert "eval step 3" not in text
