"""Benchmark: the real trainer's three modes, 2 CPU ranks, the `small` recipe, BERT's vocab.

Launches `deepspeed --num_accelerators 2 tcd_ds/train.py --config small --mode M` for vanilla, moe
and tcd (its teacher: the vanilla launch's export), one thread per rank, a fixed number of steps on
a slice of the Wikipedia extract (the trainer's fallback corpus without ../shared/data), in fp32
(ds_configs/cpu_zero2.json) and, where the CPU has bf16 matmul instructions, in bf16
(cpu_zero2_bf16.json). From each run's summary.json: tokens/s (the median logging window after the
first two), step time, and where a step's time went (the trainer's per-phase clock: data, student
forward, teacher forward, relation losses, backward, optimizer step incl. ZeRO's reduction). MFU is
the trainer's model FLOPs per token x tokens/s over the fp32 and the bf16 matmul peaks measured in
this process before the launches (2 threads: both cores, what the 2 ranks share).
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tcd_ds.bench.common import md_table, target
from tcd_ds.bench.scaling import REPO, command, launch

PHASES = ("data", "student", "teacher", "relation", "backward", "optimizer")
MODES = ("vanilla", "moe", "tcd")
# (row name, mode, extra overrides): the three modes, and MoE with torch's default (single-tensor) AdamW,
# the trainer's optimizer before 9ebf7a2 made it fused: the profile before that change
RUNS = (("vanilla", "vanilla", ()), ("moe", "moe", ()),
        ("moe, unfused AdamW (before)", "moe", ("train.fused_optimizer=false",)), ("tcd", "tcd", ()))
FULL = {"recipe": "small", "ranks": 2, "steps": 30, "log_every": 5, "timeout_s": 900, "extra": [], "moe_extra": []}
QUICK = {"recipe": "tiny", "ranks": 2, "steps": 2, "log_every": 1, "timeout_s": 300,
         "extra": ["train.micro_batch_size=4"], "moe_extra": ["model.moe.num_experts=8"]}
DS_CONFIGS = {"fp32": "ds_configs/cpu_zero2.json", "bf16": "ds_configs/cpu_zero2_bf16.json"}
TARGETS = {"vanilla_tps": 16_000.0, "moe_over_vanilla": 0.75, "tcd_over_moe": 0.75}


def matmul_peaks(threads: int = 2) -> dict[str, float]:
    """GFLOP/s of a large fp32 and bf16 matmul on `threads` threads (bf16 only where it is native)."""
    from tcd_ds.hardware import cpu_bf16_native
    from tcd_ds.monitor import measure_matmul_peak

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu = torch.device("cpu")
        peaks = {"fp32": measure_matmul_peak(cpu, torch.float32) / 1e9}
        if cpu_bf16_native():
            peaks["bf16"] = measure_matmul_peak(cpu, torch.bfloat16) / 1e9
        return peaks
    finally:
        torch.set_num_threads(old)


def _run(name: str, mode: str, extra: tuple, dtype: str, cfg: dict[str, Any], tmp: Path, cache: str,
         teacher: Path | None) -> dict[str, Any]:
    run_dir = tmp / f"{name.split(',')[0]}{'-before' if extra else ''}-{dtype}"
    run_dir.mkdir()
    launch_cfg = {**cfg, "mode": mode, "ds_config": DS_CONFIGS[dtype],
                  "extra": [*cfg["extra"], *(cfg["moe_extra"] if mode != "vanilla" else []), *extra,
                            *([f"teacher.path={teacher}"] if mode == "tcd" else [])]}
    started = time.perf_counter()
    proc = launch(cfg["ranks"], 1, run_dir, launch_cfg, cache)
    try:
        rc = proc.wait(timeout=cfg["timeout_s"])
    finally:
        proc.log.close()  # type: ignore[attr-defined]
    summary_file = run_dir / "run" / "summary.json"
    if rc != 0 or not summary_file.is_file():
        log = (run_dir / "launch.log").read_text(errors="replace")
        raise RuntimeError(f"trainer {mode} {dtype} failed (exit {rc}):\n{log[-3000:]}")
    summary = json.loads(summary_file.read_text())
    hist = summary["history"]
    skip = min(2, max(len(hist) - 1, 0))
    windows = hist[skip:]
    phases = {p: statistics.mean(h.get(f"time_{p}", 0.0) for h in windows) for p in PHASES}
    return {"variant": name, "mode": mode, "dtype": dtype, "steps": summary["steps"], "world_size": summary["world_size"],
            "tokens_per_second": statistics.median(h["tokens_per_second"] for h in windows),
            "step_time_s": summary["step_time_s"], "mfu_trainer": summary.get("mfu"),
            "flops_per_token": None, "phases_s": phases, "wall_s": time.perf_counter() - started,
            "run_dir": run_dir, "command": " ".join(command(cfg["ranks"], run_dir / "run", launch_cfg, cache))}


def _flops_per_token(recipe: str, mode: str) -> float:
    from tcd_ds.config import build_config
    from tcd_ds.model.bert import flops_per_token

    cfg = build_config(recipe, [f"mode={'vanilla' if mode == 'vanilla' else 'moe'}"])
    return flops_per_token(cfg.model, cfg.data.max_seq_len, cfg.data.mlm_probability)


def run(quick: bool = False) -> tuple[list[dict[str, Any]], dict[str, float]]:
    from tcd_ds.hardware import cpu_bf16_native

    cfg = QUICK if quick else FULL
    peaks = matmul_peaks()
    dtypes = ["fp32", "bf16"] if cpu_bf16_native() else ["fp32"]
    cache = str(REPO / ".cache" / "tcd_ds")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tcd-bench-trainer-") as tmp:
        for dtype in dtypes:
            teacher = None
            for name, mode, extra in RUNS:
                r = _run(name, mode, extra, dtype, cfg, Path(tmp), cache, teacher)
                if mode == "vanilla":
                    teacher = r["run_dir"] / "run" / "export"
                r["run_dir"] = str(r["run_dir"])
                r["flops_per_token"] = _flops_per_token(cfg["recipe"], mode)
                for name, peak in peaks.items():
                    r[f"mfu_{name}"] = r["flops_per_token"] * r["tokens_per_second"] / (peak * 1e9)
                rows.append(r)
    return rows, peaks


def format_table(rows: list[dict[str, Any]], peaks: dict[str, float]) -> str:
    heads = ["variant", "dtype", "steps", "tokens/s", "step s", *[f"MFU vs {k} peak" for k in peaks],
             *[f"{p} %" for p in PHASES]]
    out = []
    for r in rows:
        total = sum(r["phases_s"].values()) or 1.0
        out.append([r["variant"], r["dtype"], r["steps"], r["tokens_per_second"], r["step_time_s"],
                    *[r[f"mfu_{k}"] for k in peaks], *[100 * r["phases_s"][p] / total for p in PHASES]])
    return md_table(heads, out, align="llrrr" + "r" * (len(peaks) + len(PHASES)))


def targets(rows: list[dict[str, Any]], peaks: dict[str, float], recipe: str) -> list[dict[str, Any]]:
    if recipe != "small":
        return []
    best = {m: max((r for r in rows if r["variant"] == m), key=lambda r: r["tokens_per_second"]) for m in MODES}
    v, m, t = (best[x]["tokens_per_second"] for x in MODES)

    def shares(r):
        total = sum(r["phases_s"].values()) or 1.0
        top = sorted(PHASES, key=lambda p: -r["phases_s"][p])[:3]
        return ", ".join(f"{p} {100 * r['phases_s'][p] / total:.0f} %" for p in top)

    def fwd_bwd(r):
        return r["phases_s"]["student"] + r["phases_s"]["backward"]

    def step_s(r):
        return sum(r["phases_s"].values())

    no_bf16 = "" if "bf16" in peaks else " (this CPU has no bf16 matmul instructions: fp32 only)"
    return [
        target("trainer, small, 2 ranks, vanilla tokens/s (BERT vocab)", v, TARGETS["vanilla_tps"], ">=",
               bound=f"{best['vanilla']['dtype']}{no_bf16}: {best['vanilla']['mfu_fp32']:.0%} of the fp32 matmul "
               f"peak ({peaks['fp32']:.0f} GFLOP/s on 2 threads, this run); the step: {shares(best['vanilla'])}; "
               f"{TARGETS['vanilla_tps']:.0f} tok/s needs {TARGETS['vanilla_tps'] * best['vanilla']['flops_per_token'] / 1e9:.0f}"
               " GFLOP/s of model FLOPs"),
        target("trainer, small, 2 ranks, MoE / vanilla tokens/s", m / v, TARGETS["moe_over_vanilla"], ">=",
               bound=f"the MoE step: {shares(best['moe'])}; its forward + backward take "
               f"{fwd_bwd(best['moe']):.2f} s per step against vanilla's {fwd_bwd(best['vanilla']):.2f} s (same "
               "tokens): the difference is the MoE layers (router, the dispatch to 64 experts' small GEMMs and, "
               "with ep_size 2, DeepSpeed-MoE's all-to-alls over gloo), not the optimizer"),
        target("trainer, small, 2 ranks, TCD / MoE tokens/s", t / m, TARGETS["tcd_over_moe"], ">=",
               bound=f"the TCD step: {shares(best['tcd'])}; per step it adds {step_s(best['tcd']) - step_s(best['moe']):.2f} s "
               f"to the MoE step: teacher forward {best['tcd']['phases_s']['teacher']:.2f} s, relation losses "
               f"{best['tcd']['phases_s']['relation']:.2f} s, and {fwd_bwd(best['tcd']) - fwd_bwd(best['moe']):+.2f} s "
               "in the student's forward + backward (the taps, and the relation losses' backward through them, "
               "run there)"),
    ]


def section(quick: bool = False) -> dict[str, Any]:
    cfg = QUICK if quick else FULL
    rows, peaks = run(quick)
    notes = [
        f"the real trainer, recipe {cfg['recipe']}, {cfg['ranks']} ranks x 1 thread, deepspeed launcher, ZeRO-2, "
        f"{cfg['steps']} steps, BERT's 30,522-token vocab, MoE on the deepspeed backend with ep_size 2 (each rank holds half the experts); tokens/s: the median "
        f"logging window ({cfg['log_every']} steps) after the first two; step s: summary.json's mean.",
        "phase %: the trainer's per-phase clock (tcd_ds/train.py PhaseClock; metrics.jsonl time_<phase>, "
        "seconds per step), mean over the same windows: data = batch and masking, student = the student's "
        "forward (taps included), teacher = the frozen teacher's forward, relation = the relation losses, "
        "backward = DeepSpeed's backward, optimizer = the optimizer step with ZeRO's gradient reduction.",
        "moe, unfused AdamW (before): the moe run with train.fused_optimizer=false (torch's default, single-tensor "
        "AdamW on CPU), the trainer's optimizer before 9ebf7a2; against the moe row: the profile before and after "
        "that change.",
        "matmul peaks (GFLOP/s, 2 threads, this run): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()),
    ]
    if quick:
        notes.append("quick mode: tiny recipe, 2 steps, 8 experts, micro-batch 4: a plumbing check, not a measurement.")
    notes += [f"command ({r['variant']}, {r['dtype']}): `{r['command']}`" for r in rows]
    return {"name": "trainer", "title": "Trainer: vanilla, MoE and TCD on 2 ranks, where a step's time goes",
            "rows": rows, "table": format_table(rows, peaks), "notes": notes,
            "targets": targets(rows, peaks, cfg["recipe"]), "matmul_peaks_gflops": peaks,
            "params": {k: v for k, v in cfg.items()}}
