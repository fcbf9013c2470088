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
from tcd_ds.bench.scaling import command, launch
from tcd_ds.resources import ROOT

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
TARGETS = {"vanilla_mfu": 0.40, "moe_over_vanilla": 0.5, "tcd_over_moe": 0.8}
# The experiment's own settings (recipes/experiments/small.yaml and premise.yaml): one rank, one
# thread, the small model with its 8k WordPiece vocab, rotary positions, no dropout, 30 % masking,
# `--deepspeed_config auto` (tcd_ds/hardware.py: per CPU, model kind and world size), the torch MoE
# backend; 64 experts, and 8 experts for the premise study's variant.
ONE_RANK_EXTRA = ["data.vocab=wordpiece:8192", "model.position_encoding=rotary", "model.hidden_dropout=0",
                  "model.attention_dropout=0", "data.mlm_probability=0.3"]
ONE_RANK_RUNS = (("vanilla", "vanilla", ()), ("moe", "moe", ()), ("tcd", "tcd", ()),
                 ("moe, 8 experts", "moe", ("model.moe.num_experts=8",)))
# the MoE step as it ran before `auto` chose by model and world size (ZeRO-2, bf16 where native, the
# backward all-reduce over a group of one): the before/after of the same run
ONE_RANK_BEFORE = ("moe, before: ZeRO-2 config", "moe", ())
ONE_RANK = {"recipe": "small", "steps": 30, "log_every": 5, "timeout_s": 900}
ONE_RANK_QUICK = {"recipe": "tiny", "steps": 2, "log_every": 1, "timeout_s": 300}
ONE_RANK_TARGETS = {"moe_over_vanilla": 0.6, "tcd_over_moe": 0.85, "moe8_over_vanilla": 0.8}


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


def measure_bandwidth(threads: int = 1, n: int = 1 << 25) -> float:
    """GB/s of a streaming fp32 add (two 128 MiB reads, one write) on `threads` threads: the memory
    bandwidth the optimizer step is bound by."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b, c = torch.rand(n), torch.rand(n), torch.empty(n)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            torch.add(a, b, out=c)
            best = min(best, time.perf_counter() - t)
        return 3 * 4 * n / best / 1e9
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
    cache = str(ROOT / ".cache" / "tcd_ds")
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


def _one_rank_command(mode: str, extra: tuple, cfg: dict[str, Any], run_dir: Path, cache: str,
                      teacher: Path | None, ds_config: str = "auto") -> list[str]:
    import sys

    shared = ROOT.parent / "shared" / "data"
    data = [f"data.corpus={shared / 'wikipedia-en-2015'}"] if shared.is_dir() else []
    return [sys.executable, "-m", "tcd_ds.train", "--config", cfg["recipe"], "--mode", mode, "--deepspeed_config",
            ds_config, "--resume", "none", *data, *(ONE_RANK_EXTRA if cfg["recipe"] == "small" else []),
            "data.max_documents=200", "data.eval_corpora=", f"data.cache_dir={cache}",
            f"train.max_steps={cfg['steps']}", f"train.log_every={cfg['log_every']}", "train.eval_every=0",
            "train.eval_batches=1", "train.save_every=0", *extra,
            *([f"teacher.path={teacher}"] if mode == "tcd" else []), f"run_dir={run_dir}"]


def run_one_rank(quick: bool = False) -> list[dict[str, Any]]:
    """The trainer as the experiments run it: `python -m tcd_ds.train`, 1 rank, OMP_NUM_THREADS=1."""
    import os
    import subprocess

    from tcd_ds.hardware import cpu_ds_config

    cfg = ONE_RANK_QUICK if quick else ONE_RANK
    cache = str(ROOT / ".cache" / "tcd_ds")
    rows, teacher = [], None
    before = cpu_ds_config(moe=False, ranks=2)  # the ZeRO-2 config auto chose for every model before
    runs = [(*r, "auto") for r in ONE_RANK_RUNS] + [(*ONE_RANK_BEFORE, before)]
    with tempfile.TemporaryDirectory(prefix="tcd-bench-trainer1-") as tmp:
        for name, mode, extra, ds in runs:
            run_dir = Path(tmp) / name.replace(", ", "-").replace(" ", "").replace(":", "")
            cmd = _one_rank_command(mode, extra, cfg, run_dir, cache, teacher, ds)
            started = time.perf_counter()
            log = Path(tmp) / f"{run_dir.name}.log"
            with open(log, "w") as f:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=cfg["timeout_s"],
                                    env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
            if rc != 0 or not (run_dir / "summary.json").is_file():
                raise RuntimeError(f"trainer {name} failed (exit {rc}):\n{log.read_text(errors='replace')[-3000:]}")
            summary = json.loads((run_dir / "summary.json").read_text())
            chosen = ds if ds != "auto" else next((line.split(": ", 1)[1] for line in log.read_text().splitlines()
                                                   if line.startswith("--deepspeed_config auto: ")), "?")
            windows = summary["history"][min(2, max(len(summary["history"]) - 1, 0)):]
            rows.append({"variant": name, "mode": mode, "ds_config": Path(chosen).name,
                         "dtype": "bf16" if "bf16" in chosen else "fp32", "steps": summary["steps"],
                         "tokens_per_second": statistics.median(h["tokens_per_second"] for h in windows),
                         "step_time_s": summary["step_time_s"], "parameters": summary.get("parameters"),
                         "phases_s": {p: statistics.mean(h.get(f"time_{p}", 0.0) for h in windows) for p in PHASES},
                         "wall_s": time.perf_counter() - started,
                         "command": " ".join(cmd).replace(tmp, "<tmp>")})
            if mode == "vanilla":
                teacher = run_dir / "export"
    return rows


def one_rank_targets(rows: list[dict[str, Any]], peaks: dict[str, float], bandwidth_gbs: float) -> list[dict]:
    """The three 1-rank targets, each with the bound that limits it, from this run's figures."""
    by = {r["variant"]: r for r in rows}
    if not {n for n, _, _ in ONE_RANK_RUNS} <= set(by):
        return []
    v, m, t, m8 = (by[n] for n in ("vanilla", "moe", "tcd", "moe, 8 experts"))
    tps = {k: r["tokens_per_second"] for k, r in by.items()}

    def step(r):
        return sum(r["phases_s"].values())

    def optimizer_bound(r):  # fp32 master weights, gradients and two moments read, three written: 28 B a parameter
        return 28 * (r["parameters"] or 0) / (bandwidth_gbs * 1e9)

    def profile(r):
        return ", ".join(f"{p} {r['phases_s'][p]:.3f}" for p in PHASES if r["phases_s"][p] >= 0.0005)

    name = "trainer, small, 1 rank x 1 thread, 8k vocab"
    added = step(t) - step(m)
    return [
        target(f"{name}: MoE / vanilla tokens/s", tps["moe"] / tps["vanilla"], ONE_RANK_TARGETS["moe_over_vanilla"],
               ">=", bound=f"MoE ({m['dtype']}) s/step: {profile(m)} against vanilla's ({v['dtype']}) {profile(v)}; "
               f"the same FLOPs a token, so the bound is vanilla's step plus the optimizer over "
               f"{(m['parameters'] or 0) / 1e6:.0f} M parameters, >= {optimizer_bound(m):.3f} s at "
               f"{bandwidth_gbs:.1f} GB/s (28 B a parameter): ratio <= "
               f"{step(v) / (step(v) + optimizer_bound(m)):.2f}"),
        target(f"{name}: TCD / MoE tokens/s", tps["tcd"] / tps["moe"], ONE_RANK_TARGETS["tcd_over_moe"], ">=",
               bound=f"TCD adds {added:.3f} s a step to MoE's {step(m):.3f}: teacher forward "
               f"{t['phases_s']['teacher']:.3f}, relation losses {t['phases_s']['relation']:.3f}, student forward + "
               f"backward {t['phases_s']['student'] + t['phases_s']['backward'] - m['phases_s']['student'] - m['phases_s']['backward']:+.3f}; "
               f"the teacher forward alone bounds the ratio at {step(m) / (step(m) + t['phases_s']['teacher']):.2f}"),
        target(f"{name}, 8 experts: MoE / vanilla tokens/s", tps["moe, 8 experts"] / tps["vanilla"],
               ONE_RANK_TARGETS["moe8_over_vanilla"], ">=",
               bound=f"MoE-8 ({m8['dtype']}) s/step: {profile(m8)} against vanilla's ({v['dtype']}) {profile(v)}"),
    ]


def format_table(rows: list[dict[str, Any]], peaks: dict[str, float]) -> str:
    heads = ["variant", "dtype", "steps", "tokens/s", "step s", *[f"MFU vs {k} peak" for k in peaks],
             *[f"{p} %" for p in PHASES]]
    out = []
    for r in rows:
        total = sum(r["phases_s"].values()) or 1.0
        out.append([r["variant"], r["dtype"], r["steps"], r["tokens_per_second"], r["step_time_s"],
                    *[r[f"mfu_{k}"] for k in peaks], *[100 * r["phases_s"][p] / total for p in PHASES]])
    return md_table(heads, out, align="llrrr" + "r" * (len(peaks) + len(PHASES)))


def _dispatch_bound(recipe: str) -> str:
    """What the 2-rank MoE step pays beyond the experts' FLOPs, as far as measured."""
    from tcd_ds.config import build_config

    cfg = build_config(recipe, ["mode=moe"])
    s = cfg.train.micro_batch_size * cfg.data.max_seq_len
    return (f"Not yet attributed within the layer: DeepSpeed-MoE (0.19.8: index dispatch, no dense einsum) pads "
            f"every expert to the largest load when dropless (E C = E x max_fraction x S rows computed and sent by "
            f"two gloo all-to-alls, S = {s} tokens a rank; TensorBoard's experts/layerN/max_fraction gives the "
            "factor), and its gate builds [S, E] one-hots; the next measurement splits these")


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
    van = best["vanilla"]
    dtype = van["dtype"]
    return [
        target("trainer, small, 2 ranks, vanilla MFU (BERT vocab, of its dtype's matmul peak)",
               van[f"mfu_{dtype}"], TARGETS["vanilla_mfu"], ">=",
               bound=f"{dtype}{no_bf16}, {v:.0f} tok/s: {van[f'mfu_{dtype}']:.0%} of the {dtype} matmul peak ({peaks[dtype]:.0f} GFLOP/s on 2 threads, this run); the "
               f"step: {shares(van)}"),
        target("trainer, small, 2 ranks, MoE / vanilla tokens/s", m / v, TARGETS["moe_over_vanilla"], ">=",
               bound=f"the MoE step: {shares(best['moe'])}; its forward + backward take "
               f"{fwd_bwd(best['moe']):.2f} s per step against vanilla's {fwd_bwd(best['vanilla']):.2f} s (same "
               f"tokens). {_dispatch_bound(recipe)}"),
        target("trainer, small, 2 ranks, TCD / MoE tokens/s", t / m, TARGETS["tcd_over_moe"], ">=",
               bound=f"the TCD step: {shares(best['tcd'])}; per step it adds {step_s(best['tcd']) - step_s(best['moe']):.2f} s "
               f"to the MoE step: teacher forward {best['tcd']['phases_s']['teacher']:.2f} s, relation losses "
               f"{best['tcd']['phases_s']['relation']:.2f} s, and {fwd_bwd(best['tcd']) - fwd_bwd(best['moe']):+.2f} s "
               "in the student's forward + backward (the taps, and the relation losses' backward through them, "
               "run there)"),
    ]


def format_one_rank(rows: list[dict[str, Any]]) -> str:
    heads = ["variant", "ds config", "tokens/s", "step s", *[f"{p} s" for p in PHASES]]
    out = [[r["variant"], r["ds_config"], r["tokens_per_second"], r["step_time_s"],
            *[r["phases_s"][p] for p in PHASES]] for r in rows]
    return md_table(heads, out, align="llrr" + "r" * len(PHASES))


def section(quick: bool = False) -> dict[str, Any]:
    cfg = QUICK if quick else FULL
    one = ONE_RANK_QUICK if quick else ONE_RANK
    bandwidth = measure_bandwidth(1)
    one_rank = run_one_rank(quick)
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
    notes += [
        f"1 rank x 1 thread (the second table, run first): the experiments' trainer, `python -m tcd_ds.train` with "
        f"OMP_NUM_THREADS=1, recipe {one['recipe']}, {one['steps']} steps, the 8k WordPiece vocab, rotary, no dropout, "
        "30 % masking, `--deepspeed_config auto` (the config it chose is in the table), the torch MoE backend, 64 "
        "experts (8 in the last row); TCD's teacher is the vanilla row's export (teacher.dtype auto). Phases as above, "
        "in seconds a step.",
        f"memory bandwidth, 1 thread (streaming fp32 add, this run): {bandwidth:.1f} GB/s; the optimizer bound: 28 B "
        "a parameter (fp32 weights, gradients and two moments read, weights and moments written) over it.",
    ]
    by = {r["variant"]: r["tokens_per_second"] for r in one_rank}
    if {"vanilla", "moe", ONE_RANK_BEFORE[0]} <= set(by):
        notes.append(f"1 rank, before and after `auto` chose by model and world size: MoE / vanilla tokens/s "
                     f"{by[ONE_RANK_BEFORE[0]] / by['vanilla']:.2f} with the MoE run on the ZeRO-2 config auto used "
                     f"to pick for every model ({next(r['ds_config'] for r in one_rank if r['variant'] == ONE_RANK_BEFORE[0])}"
                     f", the backward all-reduce on), {by['moe'] / by['vanilla']:.2f} now (the row `moe`).")
    notes += [f"command (1 rank, {r['variant']}): `{r['command']}`" for r in one_rank]
    return {"name": "trainer", "title": "Trainer: vanilla, MoE and TCD on 2 ranks and on 1 rank x 1 thread, where "
            "a step's time goes", "rows": rows, "one_rank_rows": one_rank,
            "table": format_table(rows, peaks) + "\n\n" + format_one_rank(one_rank), "notes": notes,
            "targets": [*targets(rows, peaks, cfg["recipe"]),
                        *(one_rank_targets(one_rank, peaks, bandwidth) if one["recipe"] == "small" else [])],
            "matmul_peaks_gflops": peaks, "memory_bandwidth_gbs_1_thread": bandwidth,
            "params": {k: v for k, v in cfg.items()}}
