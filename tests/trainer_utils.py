"""Helpers for tests that run the real trainer in subprocesses (not a test module)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


from tcd_ds.dist import free_port  # noqa: E402,F401 - re-exported for the tests


def quick(shared: Path, cache: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    """Overrides for a run of a few steps on a small slice of the real corpus."""
    d = shared
    return [f"data.corpus={d / 'wikipedia-en-2015'}", f"data.vocab={d / 'vocab' / 'bert-base-uncased-vocab.txt'}",
            f"data.eval_corpora=wikitext2={d / 'wikitext-2' / 'wiki.test.raw'},gutenberg={d / 'gutenberg-novels'}",
            "data.max_documents=40", "data.eval_max_sequences=16", f"data.cache_dir={cache}",
            f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
            "train.micro_batch_size=8", "train.warmup_steps=2", f"run_dir={run_dir}", *extra]


# argv: FAULTS trainer-args...; FAULTS such as "3:mlm,4:T,5:grad": step 3's forward returns a NaN MLM
# loss, step 4's a NaN relation loss L_T, step 5's a loss whose gradients are NaN (a hook on one
# parameter). The trainer itself knows nothing of faults: its skip protocol meets them as real ones.
FAULT_RUNNER = r"""
import sys
import torch
import tcd_ds.train as t
faults = {int(s): term for s, term in (item.split(":") for item in sys.argv[1].split(","))}
real_step, real_forward, current = t.train_step, t.forward_loss, [0]
def train_step(trainer, step):
    current[0] = step
    return real_step(trainer, step)
def forward_loss(engine, *args, **kwargs):
    loss, parts, out = real_forward(engine, *args, **kwargs)
    fault = faults.get(current[0])
    if fault == "grad":
        poison = next(engine.module.parameters()).sum() * 0.0
        poison.register_hook(lambda g: g * float("nan"))
        loss = loss + poison
    elif fault:
        name = fault if fault in ("mlm", "aux") else t.term_name(fault)
        parts[name] = torch.tensor(float("nan"))
        loss = loss + parts[name].to(loss.device)
    return loss, parts, out
t.train_step, t.forward_loss = train_step, forward_loss
t.main(sys.argv[2:])
"""


def launcher_cmd(args: list[str], ranks: int, faults: str | None = None) -> list[str]:
    if faults:
        assert ranks == 1, "fault injection runs one rank"
        return [sys.executable, "-c", FAULT_RUNNER, faults, *args]
    if ranks == 1:
        return [sys.executable, "-m", "tcd_ds.train", *args]
    return ["deepspeed", "--num_accelerators", str(ranks), "--master_port", str(free_port()), "tcd_ds/train.py", *args]


def launch(args: list[str], log: Path, ranks: int = 2, timeout: float = 400, env: dict | None = None,
           faults: str | None = None) -> subprocess.CompletedProcess:
    """Run the trainer to its end; `faults`: see FAULT_RUNNER."""
    with open(log, "w") as f:
        return subprocess.run(launcher_cmd(args, ranks, faults), cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout, env=None if env is None else {**os.environ, **env})


def start(args: list[str], log: Path, ranks: int = 2) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen(launcher_cmd(args, ranks), cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended before {what}: {log.read_text()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{local rank: pid} of the deepspeed launcher's worker processes."""
    import psutil

    out = {}
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            for a in p.cmdline():
                if a.startswith("--local_rank="):
                    out[int(a.split("=")[1])] = p.pid
        except psutil.NoSuchProcess:
            continue
    return out


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# --- the trainer in this process ---------------------------------------------------------------

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_launch_env(monkeypatch) -> None:
    """No launcher variables for the rest of the test, and none left behind after it: the trainer's
    `init_distributed` exports RANK, WORLD_SIZE, MASTER_PORT... into os.environ, and `delenv` alone
    records nothing to undo for a variable that was absent, so an in-process run leaked them into
    every later subprocess of the session (a wheel test's trainer then took the stale MASTER_PORT as
    a launcher's and stopped on 'port already in use' in CI)."""
    for key in LAUNCH_ENV:
        monkeypatch.setenv(key, "")  # records the variable's state before the test (absent included)
        monkeypatch.delenv(key)


class NoSignals:
    """Stands in for the trainer's StopRequest: no handlers installed in the test process, no stop."""

    signal = None

    def agreed(self, device) -> bool:
        return False


def train_in_process(args: list[str], monkeypatch) -> dict:
    """`tcd_ds.train.main(args)` in this process, one rank (a gloo world of one, closed at the end
    by main), as `python -m tcd_ds.train` would run it; returns the summary. Each call starts from a
    launcher-free environment (main exports the layout's variables; monkeypatch restores them)."""
    from tcd_ds import train as tr

    clean_launch_env(monkeypatch)
    monkeypatch.setattr(tr, "StopRequest", NoSignals)
    monkeypatch.setattr(tr, "measure_matmul_peak", lambda *a, **k: 1e12)  # half a second per run saved
    return tr.main(args)
