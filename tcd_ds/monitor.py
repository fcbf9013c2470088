"""TensorBoard scalars and histograms, a progress line with ETA, throughput and MFU.

Only rank 0 writes; every rank may call (the calls are no-ops elsewhere).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                        seconds: float = 0.5) -> float:
    """This machine's own dense matmul throughput in FLOP/s (the MFU denominator)."""
    g = torch.Generator(device=device).manual_seed(0)  # private: the training RNG streams stay untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iters += 1
    sync()
    return 2 * n ** 3 * iters / (time.perf_counter() - start)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Monitor:
    def __init__(self, run_dir: str | Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled, self.total_steps = enabled, total_steps
        self.start_step, self.start_time = start_step, time.perf_counter()
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def histogram(self, step: int, tag: str, values: torch.Tensor) -> None:
        if self.writer:
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def progress(self, step: int, values: dict[str, float]) -> None:
        """One line on stderr: step, percent, ETA and the last losses."""
        if not self.enabled:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / done * (self.total_steps - step) if done > 0 else 0.0
        shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        print(f"step {step}/{self.total_steps} [{100 * step / self.total_steps:3.0f}%] {shown} | "
              f"elapsed {format_duration(elapsed)} ETA {format_duration(eta)}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.writer:
            self.writer.flush()
            self.writer.close()


class MetricsLog:
    """`metrics.jsonl` in the run dir: one line per logged train step or eval, appended and flushed.

    It outlives crashes and resumes; `read()` keeps the last line per (kind, step), so the steps a
    crashed run logged after its last checkpoint are superseded by the resumed run's."""

    def __init__(self, path: str | Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def append(self, kind: str, step: int, values: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")

    def read(self, kind: str) -> list[dict]:
        rows: dict[int, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut off by a crash
                    continue
                if row.get("kind") == kind:
                    rows[row["step"]] = {k: v for k, v in row.items() if k != "kind"}
        return [rows[s] for s in sorted(rows)]
