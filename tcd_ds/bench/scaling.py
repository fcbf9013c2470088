"""Benchmark: the real trainer on 1 vs 2 CPU ranks (expert parallelism over the deepspeed backend).

Launches `deepspeed --num_accelerators N tcd_ds/train.py --config tiny --mode moe --deepspeed_config
ds_configs/cpu_zero2.json model.moe.backend=deepspeed model.moe.ep_size=N ...` for N = 1 and 2 (the
same launcher both times), a few steps on a small slice of the corpus, and reads `tokens_per_second`
from the run's `summary.json`: the trainer's own figure, all ranks' tokens together, for its last
logging window (`tokens_per_second`), and the median over the logging windows of its `history`
after the first two (warm-up) windows, which is what the table reports. The micro-batch is per rank
(the recipe's), so 2 ranks process twice the tokens per step (weak scaling). Threads are set per
launch with OMP_NUM_THREADS (the launcher leaves torch's default, which would put 2 threads in each
of 2 ranks on 2 cores): 1 rank x 1 thread and 2 ranks x 1 thread (the speedup compares these: ideal
2x on 2 free cores), and 1 rank x all cores for reference.

Data: `../shared/data` when present (the Wikipedia extract, 40 documents; the token cache is
reused between runs), else the trainer's offline fallback corpus. No eval sets; one eval batch and
the final checkpoint + export happen after the timed window.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tcd_ds.bench.common import md_table
from tcd_ds.dist import free_port
from tcd_ds.resources import ROOT

_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
# launches: (ranks, OMP threads per rank)
FULL = {"launches": ((1, 1), (2, 1), (1, _CORES)), "steps": 40, "log_every": 5, "recipe": "tiny", "mode": "moe",
        "timeout_s": 900}
QUICK = {"launches": ((1, 1), (2, 1)), "steps": 2, "log_every": 1, "recipe": "tiny", "mode": "moe", "timeout_s": 300,
         "extra": ["train.micro_batch_size=4", "model.moe.num_experts=8"]}


def launcher() -> list[str]:
    exe = shutil.which("deepspeed")
    return [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]


def command(ranks: int, run_dir: Path, cfg: dict[str, Any], cache_dir: str) -> list[str]:
    shared = ROOT.parent / "shared" / "data"
    data = []
    if shared.is_dir():
        data = [f"data.corpus={shared / 'wikipedia-en-2015'}",
                f"data.vocab={shared / 'vocab' / 'bert-base-uncased-vocab.txt'}"]
    return [*launcher(), "--num_accelerators", str(ranks), "--master_port", str(free_port()), "tcd_ds/train.py",
            "--config", cfg["recipe"], "--mode", cfg["mode"], "--deepspeed_config",
            cfg.get("ds_config", "ds_configs/cpu_zero2.json"), "--resume", "none", *data, "data.max_documents=40",
            "data.eval_corpora=", f"data.cache_dir={cache_dir}", f"train.max_steps={cfg['steps']}",
            f"train.log_every={cfg['log_every']}", "train.eval_every=0", "train.eval_batches=1", "train.save_every=0",
            *([] if cfg["mode"] == "vanilla" else ["model.moe.backend=deepspeed", f"model.moe.ep_size={ranks}"]),
            *cfg.get("extra", []), f"run_dir={run_dir}"]


def launch(ranks: int, threads: int, run_dir: Path, cfg: dict[str, Any], cache_dir: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    log = open(run_dir / "launch.log", "w")
    proc = subprocess.Popen(command(ranks, run_dir / "run", cfg, cache_dir), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    proc.log, proc.omp = log, env["OMP_NUM_THREADS"]  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, ranks: int, run_dir: Path, cfg: dict[str, Any], started: float) -> dict[str, Any]:
    try:
        rc = proc.wait(timeout=cfg["timeout_s"])
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        rc = proc.wait()
    proc.log.close()  # type: ignore[attr-defined]
    log = (run_dir / "launch.log").read_text(errors="replace")
    summary_file = run_dir / "run" / "summary.json"
    if rc != 0 or not summary_file.is_file():
        raise RuntimeError(f"trainer with {ranks} rank(s) failed (exit {rc}):\n{log[-3000:]}")
    summary = json.loads(summary_file.read_text())
    windows = [h["tokens_per_second"] for h in summary.get("history", []) if h.get("tokens_per_second")]
    skip = min(2, max(len(windows) - 1, 0))
    return {"ranks": ranks, "ep_size": ranks, "omp_threads_per_rank": int(proc.omp),  # type: ignore[attr-defined]
            "steps": summary["steps"], "windows": len(windows) - skip,
            "tokens_per_second": statistics.median(windows[skip:]) if windows else summary["tokens_per_second"],
            "tokens_per_second_last_window": summary["tokens_per_second"],
            "step_time_s": summary["step_time_s"], "mfu": summary.get("mfu"),
            "world_size": summary["world_size"], "wall_s": time.perf_counter() - started}


class Launches:
    """The scaling runs, started now, collected by `finish()`.

    Full mode launches them one after the other inside `finish()`. Quick mode (a plumbing check for
    CI) starts them all at once in `__init__`, so the suite can run its other sections meanwhile and
    CI waits for about one launch instead of two plus everything else.
    """

    def __init__(self, quick: bool = False):
        self.quick, self.cfg = quick, QUICK if quick else FULL
        self.cache_dir = str(ROOT / ".cache" / "tcd_ds")
        self.tmp = tempfile.TemporaryDirectory(prefix="tcd-bench-scaling-")
        self.commands: list[str] = []
        self.started: list[tuple] = []
        if quick:
            for n, threads in self.cfg["launches"]:
                self.started.append(self._start(n, threads))

    def _start(self, n: int, threads: int) -> tuple:
        run_dir = Path(self.tmp.name) / f"ranks{n}-threads{threads}"
        run_dir.mkdir()
        self.commands.append(f"OMP_NUM_THREADS={threads} " + " ".join(command(n, run_dir / "run", self.cfg,
                                                                               self.cache_dir)))
        return n, run_dir, launch(n, threads, run_dir, self.cfg, self.cache_dir), time.perf_counter()

    def finish(self) -> tuple[list[dict[str, Any]], list[str]]:
        try:
            if self.quick:
                rows = [_finish(p, n, d, self.cfg, t0) for n, d, p, t0 in self.started]
            else:
                rows = []
                for n, threads in self.cfg["launches"]:
                    n, d, p, t0 = self._start(n, threads)
                    self.started.append((n, d, p, t0))
                    rows.append(_finish(p, n, d, self.cfg, t0))
        finally:
            for _, _, p, _ in self.started:
                if p.poll() is None:
                    os.killpg(p.pid, 9)
                    p.wait()
            self.tmp.cleanup()
        base = rows[0]["tokens_per_second"]  # 1 rank x 1 thread
        for r in rows:
            r["speedup"] = r["tokens_per_second"] / base
            r["variant"] = (f"{r['ranks']} rank{'s' if r['ranks'] > 1 else ''} x {r['omp_threads_per_rank']} "
                            f"thread{'s' if r['omp_threads_per_rank'] > 1 else ''} (ep_size {r['ep_size']})")
        return rows, self.commands


def run(quick: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    return Launches(quick).finish()


def format_table(rows: list[dict[str, Any]]) -> str:
    return md_table(["variant", "steps", "tokens/s (all ranks, median window)", "tokens/s (last window)",
                     "step s (mean)", "MFU (last window)", "speedup vs 1 x 1"],
                    [[r["variant"], r["steps"], r["tokens_per_second"], r["tokens_per_second_last_window"],
                      r["step_time_s"], r["mfu"], r["speedup"]] for r in rows])


def section(quick: bool = False, threads: int | None = None, launches: Launches | None = None) -> dict[str, Any]:
    """This benchmark as a section of the suite; `launches`: runs already started (quick mode)."""
    cfg = QUICK if quick else FULL
    rows, commands = (launches or Launches(quick)).finish()
    notes = [
        f"the real trainer, recipe {cfg['recipe']}, mode {cfg['mode']}, deepspeed backend, ZeRO-2 fp32 "
        f"(ds_configs/cpu_zero2.json), {cfg['steps']} steps; tokens/s from summary.json: the median of its "
        f"history's logging windows ({cfg['log_every']} steps each) after the first two, and its last window; "
        "all ranks' tokens; micro-batch per rank (weak scaling).",
        "threads per rank set with OMP_NUM_THREADS; the speedup compares 2 ranks x 1 thread with 1 rank x 1 "
        "thread (ideal 2x on two free cores; each rank adds the gloo all-to-all of expert parallelism and the "
        "ZeRO gradient reduction, and on this shared 2-core machine other jobs took part of the second core).",
    ]
    if quick:
        notes.append("quick mode: 2 steps, 8 experts, micro-batch 4, both launches at once and concurrent with the "
                     "other sections: a plumbing check, not a measurement.")
    notes += [f"command ({r['variant']}): `{c}`" for r, c in zip(rows, commands)]
    out = {"name": "scaling", "title": "Scaling: the trainer on 1 vs 2 CPU ranks", "rows": rows,
           "table": format_table(rows), "notes": notes, "targets": [], "commands": commands,
           "params": {k: [list(x) for x in v] if k == "launches" else v for k, v in cfg.items()}}
    return out
