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


def launcher_cmd(args: list[str], ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "tcd_ds.train", *args]
    return ["deepspeed", "--num_accelerators", str(ranks), "--master_port", str(free_port()), "tcd_ds/train.py", *args]


def launch(args: list[str], log: Path, ranks: int = 2, timeout: float = 400, env: dict | None = None
           ) -> subprocess.CompletedProcess:
    with open(log, "w") as f:
        return subprocess.run(launcher_cmd(args, ranks), cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
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
