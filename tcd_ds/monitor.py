"""TensorBoard scalars and histograms, a progress line with ETA, throughput and MFU.

Only rank 0 writes; every rank may call (the calls are no-ops elsewhere).
"""
from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

from tcd_ds.atomic import read_jsonl
from tcd_ds.cli import format_duration
from tcd_ds.hardware import cpu_bf16_native


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                        seconds: float = 0.5) -> float:
    """This machine's own dense matmul throughput in FLOP/s (the MFU denominator). Takes about
    `seconds`, or one matmul's time where that is longer (emulated bf16 on a CPU without it)."""
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_bf16_native():
        n = min(n, 256)  # emulated bf16: a 1024^3 matmul alone would take ~10 s
    g = torch.Generator(device=device).manual_seed(0)  # private: the training RNG streams stay untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # first call: allocation, kernel choice
    sync()
    start = time.perf_counter()
    a @ b
    sync()
    once = time.perf_counter() - start
    if once >= seconds / 4:
        return 2 * n ** 3 / once
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iters += 1
    sync()
    return 2 * n ** 3 * iters / (time.perf_counter() - start)


class Monitor:
    def __init__(self, run_dir: str | Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled, self.total_steps = enabled, total_steps
        self.start_step, self.start_time = start_step, time.perf_counter()
        self.writer = None
        self.described: set[str] = set()  # tags whose description was written
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float], descriptions: dict[str, str] | None = None) -> None:
        """`values` at `step`; a tag's first value in this process carries its description, if given
        (TensorBoard shows it beside the chart)."""
        if not self.writer:
            return
        for tag, value in values.items():
            text = (descriptions or {}).get(tag)
            if text and tag not in self.described:
                self.described.add(tag)
                self.writer._get_file_writer().add_summary(described_scalar(tag, value, text), step)
            else:
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


def described_scalar(tag: str, value: float, description: str):
    """A scalar summary like `SummaryWriter.add_scalar`'s (old style: `simple_value`) whose metadata
    carries `description` (TensorBoard keeps the first metadata it reads for a tag)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata

    return Summary(value=[Summary.Value(tag=tag, simple_value=float(value),
                                        metadata=SummaryMetadata(summary_description=description))])


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
        for row in read_jsonl(self.path):  # a line cut off by a crash is skipped
            if row.get("kind") == kind:
                rows[row["step"]] = {k: v for k, v in row.items() if k != "kind"}
        return [rows[s] for s in sorted(rows)]


# --- the known-harmless library messages, silenced narrowly ------------------------------------------

class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


def quiet_known_warnings() -> None:
    """Silence the library messages every run printed that are expected and harmless here:

    - DeepSpeed's "You are using ZeRO with an untested optimizer": our optimizer is torch's AdamW
      plus a skip guard (optim.GuardedAdamW), allowed on purpose with `zero_allow_untested_optimizer`;
    - torch's FutureWarning "`torch.distributed.all_gather_into_tensor` is deprecated", printed once
      per rank from inside DeepSpeed's ZeRO partitioning (DeepSpeed's call, not ours).
    Only these exact messages; every other warning still shows."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    try:
        from deepspeed.utils import logger as ds_logger
    except ImportError:
        return
    if not any(isinstance(f, _DropMessages) for f in ds_logger.filters):
        ds_logger.addFilter(_DropMessages("You are using ZeRO with an untested optimizer"))


# --- the end of a run ---------------------------------------------------------------------------

def run_summary_block(run_dir: str | Path, summary: dict, teacher: str | Path | None = None,
                      teacher_info: str = "") -> str:
    """The block every training run ends with (rank 0, stdout): where its outputs went."""
    run_dir = Path(run_dir)
    steps, mode = summary.get("steps"), summary.get("mode")
    if summary.get("interrupted"):
        head = f"run stopped at step {steps} ({mode}; saved, rerun the same command to resume):"
        export = "none yet (written when the run completes)"
    else:
        head = f"run finished: {mode}, {steps} steps, world {summary.get('world_size')}:"
        export = str(run_dir / "export")
    lines = [head,
             f"  run dir      {run_dir}",
             f"  export       {export}",
             f"  summary      {run_dir / 'summary.json'}",
             f"  tensorboard  tensorboard --logdir {run_dir / 'tensorboard'}"]
    if teacher is not None:
        lines.append(f"  teacher      {teacher}" + (f" ({teacher_info})" if teacher_info else ""))
    return "\n".join(lines)
