"""Benchmark: relation-loss forward+backward, naive ``L x L`` vs the Gram fast path.

Cases: batch 8, L in {128, 512}, feature dim in {64, 128, 768} (student and
teacher both of that dim, fp32, teacher without grad), padded: each sequence has
a random number of valid tokens in [L/2, L] (fixed seed). Variants: ``naive``,
``gram`` and ``auto`` (whatever :func:`relation_loss` picks, reported as ``impl``),
and ``naive_autograd`` / ``gram_autograd`` (the same math by autograd through the
products: the reference the written-out gradients of ``naive``/``gram`` are tested against).

Time: ``loss = f(s, t, mask); loss.backward()``; all variants of one case run in
the calling process, interleaved round-robin after warm-up calls; the median over
the repeats is reported (``tcd_ds.bench.common.time_interleaved``).

Peak memory is measured, not estimated: every variant runs in a fresh Python
subprocess (Linux). There, after building the inputs and one warm-up call of the
same variant and size (so lazily initialised library state is not counted), the
kernel's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``) is
reset to the current RSS by writing ``5`` to ``/proc/self/clear_refs``; the
baseline ``VmRSS`` is read right then, one forward+backward runs, and the
reported ``peak_mib`` is ``VmHWM - baseline``: the extra resident memory at the
peak of that call (activations, the ``L x L`` or ``D x D`` matrices, gradients),
the median over ``MEM_REPEATS`` such measured calls.
Since PyTorch's CPU allocator does not cache, freed tensors go back to glibc;
the subprocess runs with ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB so every
buffer above that is ``mmap``-ed and returned to the kernel on free, and RSS
follows the live bytes instead of allocator free lists (``munmap`` folds the
current RSS into the high-water mark before dropping pages, so transient peaks
are kept). Without ``clear_refs``
(non-Linux), the fallback is the growth of ``ru_maxrss`` over the call, a lower
bound; the method used is recorded per row as ``mem_method``. (Times are not
taken there: every buffer being ``mmap``-ed slows the calls down.)

Quick mode (``--quick``) runs tiny sizes with few repeats, with all memory
measurements in one subprocess (the HWM is reset before each call, so the
measurement stays real, at the cost of isolation), and finishes in seconds.

Run: ``python -m tcd_ds.bench.relation [--quick] [--out FILE] [--threads N]``, or
as part of the suite, ``python -m tcd_ds.bench --only relation``.
Times are sensitive to other load on the machine (OpenMP threads oversubscribed
by other processes slow down badly); ``--threads 1`` is steadier on a shared box.
Memory figures do not depend on load.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from tcd_ds.resources import ROOT

VARIANTS = ("naive", "gram", "auto", "naive_autograd", "gram_autograd")
BATCH = 8
FULL = {"seq_lens": (128, 512), "dims": (64, 128, 768), "warmup": 2, "repeats": 30, "budget_s": 8.0}
QUICK = {"seq_lens": (32,), "dims": (8, 48), "warmup": 1, "repeats": 3, "budget_s": 0.5}
MEM_REPEATS = 3
ROW_KEYS = (
    "seq_len", "dim", "batch", "variant", "impl", "median_ms", "min_ms", "repeats",
    "peak_mib", "mem_method", "loss",
)


# --------------------------------------------------------------------------- measurement (worker side)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kib("VmHWM") is not None
    except OSError:
        return False


def _maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


def _peak_extra_mib(fn: Callable[[], None]) -> tuple[float, str]:
    """Run ``fn`` once; return (peak resident memory above the pre-call RSS in MiB, method)."""
    gc.collect()
    if _reset_hwm():
        base = _proc_status_kib("VmRSS")
        fn()
        peak = _proc_status_kib("VmHWM")
        assert base is not None and peak is not None
        return max(peak - base, 0) / 1024.0, "vmhwm_reset"
    base = _maxrss_kib()
    fn()
    return max(_maxrss_kib() - base, 0) / 1024.0, "ru_maxrss_growth"


def _make_inputs(seq_len: int, dim: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 1000 * seq_len + dim)
    s = torch.randn(batch, seq_len, dim, generator=g).requires_grad_(True)
    t = torch.randn(batch, seq_len, dim, generator=g)
    lo = max(seq_len // 2, 1)
    n_valid = torch.randint(lo, seq_len + 1, (batch,), generator=g)
    mask = torch.arange(seq_len)[None, :] < n_valid[:, None]
    return s, t, mask


def _loss_fn(variant: str):
    from tcd_ds.distill import relation as rel

    if variant == "naive_autograd":
        return rel.relation_mse_naive_reference
    if variant == "gram_autograd":
        return rel.relation_mse_gram_reference
    return lambda s, t, mask: rel.relation_loss(s, t, mask, form="mse", impl=variant)


def _impl(variant: str, seq_len: int, dim: int) -> str:
    from tcd_ds.distill import relation as rel

    return rel.choose_impl("mse", dim, dim, seq_len, variant.removesuffix("_autograd"))


def _step(variant: str, s, t, mask, out: dict | None = None) -> Callable[[], None]:
    fn = _loss_fn(variant)

    def step() -> None:
        s.grad = None
        loss = fn(s, t, mask)
        loss.backward()
        if out is not None:
            out["loss"] = float(loss.detach())

    return step


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one variant in the current process (called in a worker subprocess)."""
    seq_len, dim, batch, variant = spec["seq_len"], spec["dim"], spec["batch"], spec["variant"]
    s, t, mask = _make_inputs(seq_len, dim, batch)
    step = _step(variant, s, t, mask)
    step()  # warm-up at full size before the memory measurement
    peaks = []
    for _ in range(MEM_REPEATS):  # the median of a few measured calls: steadier for peaks of a few MiB
        s.grad = None
        peak_mib, method = _peak_extra_mib(step)
        peaks.append(peak_mib)
    return {"seq_len": seq_len, "dim": dim, "batch": batch, "variant": variant,
            "peak_mib": sorted(peaks)[len(peaks) // 2], "mem_method": method}


def time_case(seq_len: int, dim: int, batch: int, variants: Sequence[str], warmup: int, repeats: int,
              budget_s: float) -> list[dict[str, Any]]:
    """Median fwd+bwd time of every variant of one case, interleaved in this process."""
    from tcd_ds.bench.common import time_interleaved

    s, t, mask = _make_inputs(seq_len, dim, batch)
    outs = {v: {} for v in variants}
    stats = time_interleaved({v: _step(v, s, t, mask, outs[v]) for v in variants}, warmup=warmup,
                             repeats=repeats, budget_s=budget_s, min_repeats=min(5, repeats))
    return [{"seq_len": seq_len, "dim": dim, "batch": batch, "variant": v, "impl": _impl(v, seq_len, dim),
             "median_ms": stats[v]["median_ms"], "min_ms": stats[v]["min_ms"], "repeats": stats[v]["repeats"],
             "loss": outs[v]["loss"]} for v in variants]


def machine_info() -> dict[str, Any]:
    """Platform, CPU model and count, torch version and thread count of this process."""
    from tcd_ds.bench.common import machine_info as info

    return info()


def _worker(specs: list[dict[str, Any]]) -> None:
    threads = specs[0].get("threads") if specs else None
    if threads:
        torch.set_num_threads(int(threads))
    rows = [measure(spec) for spec in specs]
    print(json.dumps({"machine": machine_info(), "rows": rows}))


# --------------------------------------------------------------------------- orchestration (parent side)


def _spawn(specs: list[dict[str, Any]]) -> dict[str, Any]:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "tcd_ds.bench.relation", "--worker", json.dumps(specs)],
        capture_output=True, text=True, env=env, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _specs(quick: bool, threads: int | None = None) -> list[dict[str, Any]]:
    cfg = QUICK if quick else FULL
    return [
        {"seq_len": L, "dim": d, "batch": BATCH, "variant": v, "threads": threads,
         "warmup": cfg["warmup"], "repeats": cfg["repeats"], "budget_s": cfg["budget_s"]}
        for L in cfg["seq_lens"] for d in cfg["dims"] for v in VARIANTS
    ]


def run(
    quick: bool = False, machine: dict[str, Any] | None = None, threads: int | None = None
) -> list[dict[str, Any]]:
    """Run the benchmark; one dict per (seq_len, dim, variant) with the keys in ``ROW_KEYS``.

    Times: in this process, the variants of each case interleaved. Peak memory: one fresh
    subprocess per variant (full mode) or one subprocess for all (quick mode).
    ``threads``: torch intra-op threads, here and in the workers (default: torch's default).
    If ``machine`` is a dict it is filled with :func:`machine_info` of this process.
    """
    cfg = QUICK if quick else FULL
    specs = _specs(quick, threads)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        if machine is not None:
            machine.update(machine_info())
        rows: list[dict[str, Any]] = []
        for L in cfg["seq_lens"]:
            for d in cfg["dims"]:
                rows += time_case(L, d, BATCH, VARIANTS, cfg["warmup"], cfg["repeats"], cfg["budget_s"])
    finally:
        torch.set_num_threads(old_threads)
    batches = [specs] if quick else [[spec] for spec in specs]
    mem: dict[tuple, dict[str, Any]] = {}
    for batch in batches:
        for r in _spawn(batch)["rows"]:
            mem[(r["seq_len"], r["dim"], r["variant"])] = r
    for r in rows:
        m = mem[(r["seq_len"], r["dim"], r["variant"])]
        r["peak_mib"], r["mem_method"] = m["peak_mib"], m["mem_method"]
    return [{k: r[k] for k in ROW_KEYS} for r in rows]


def targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fast-path targets at L=512, dim 64 (when that case ran): >= 2x faster, >= 4x less memory."""
    from tcd_ds.bench.common import target

    by = {(r["seq_len"], r["dim"], r["variant"]): r for r in rows}
    naive, gram = by.get((512, 64, "naive")), by.get((512, 64, "gram"))
    if not naive or not gram:
        return []
    mem = naive["peak_mib"] / gram["peak_mib"] if gram["peak_mib"] > 0 else None
    return [target("relation L=512 dim 64: naive time / gram time", naive["median_ms"] / gram["median_ms"], 2.0, ">=",
                   value_min=naive["min_ms"] / gram["min_ms"]),
            target("relation L=512 dim 64: naive peak memory / gram peak memory", mem, 4.0, ">=")]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table; ``x naive`` columns are ratios (median time, peak memory) to the naive row of the case."""
    naive = {(r["seq_len"], r["dim"]): r for r in rows if r["variant"] == "naive"}
    lines = [
        "| L | dim | variant | impl | median ms | min ms | peak MiB | time x naive | mem x naive | loss |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = naive.get((r["seq_len"], r["dim"]))
        tr = f"{r['median_ms'] / ref['median_ms']:.2f}" if ref else "-"
        mr = f"{r['peak_mib'] / ref['peak_mib']:.2f}" if ref and ref["peak_mib"] > 0 else "-"
        lines.append(
            f"| {r['seq_len']} | {r['dim']} | {r['variant']} | {r['impl']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} "
            f"| {r['peak_mib']:.2f} | {tr} | {mr} | {r['loss']:.6g} |"
        )
    return "\n".join(lines)


def section(quick: bool = False, threads: int | None = None) -> dict[str, Any]:
    """This benchmark as a section of the suite (``python -m tcd_ds.bench``)."""
    cfg = QUICK if quick else FULL
    rows = run(quick=quick, threads=threads)
    by = {(r["seq_len"], r["dim"], r["variant"]): r for r in rows}
    cases = sorted({(r["seq_len"], r["dim"]) for r in rows})
    good = sum(1 for L, d in cases
               if by[(L, d, "auto")]["impl"] == min(("naive", "gram"), key=lambda v: by[(L, d, v)]["median_ms"]))
    notes = [
        f"batch {BATCH}, fp32, student and teacher of the same dim, padded (each sequence keeps a random "
        f"[L/2, L] valid tokens); `loss = f(s, t, mask); loss.backward()`; variants of one case interleaved "
        f"in one process, {cfg['warmup']} warm-up calls each, median of up to {cfg['repeats']} repeats.",
        "peak MiB: extra resident memory at the peak of one call, measured in a fresh subprocess per variant "
        "(VmHWM reset via /proc/self/clear_refs, glibc mmap threshold 64 KiB); see tcd_ds/bench/relation.py.",
        "`naive`/`gram` have written-out gradients (torch.autograd.Function); `*_autograd` are the same math "
        "by autograd (the references they are tested equal to in tests/test_fast_paths.py).",
        f"`auto` (Gram when max(Ds, Dt) < L) picked the faster of naive/gram in {good} of {len(cases)} cases.",
    ]
    return {"name": "relation", "title": "Relation loss forward+backward: naive L x L vs Gram", "rows": rows,
            "table": format_table(rows), "notes": notes, "targets": targets(rows),
            "params": {"batch": BATCH, **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tcd_ds.bench.relation", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="also write results as JSON here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the workers")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        _worker(json.loads(args.worker))
        return 0
    machine: dict[str, Any] = {}
    rows = run(quick=args.quick, machine=machine, threads=args.threads)

    desc = ", ".join(f"{k}={v}" for k, v in machine.items())
    print(f"relation loss fwd+bwd, batch {BATCH}, fp32 ({desc})\n")
    print(format_table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": "relation_loss", "quick": args.quick, "machine": machine, "rows": rows}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
