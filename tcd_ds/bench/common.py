"""Shared pieces of the benchmarks: the machine description, interleaved timing, markdown tables.

Timing method (every benchmark): the variants being compared run in the same process, interleaved
round-robin (A, B, C, A, B, C, ... with the order rotated every round), after `warmup` untimed
calls of each; the reported figure is the median over the timed repeats (min and max are kept
too). Interleaving spreads slow periods of a shared machine over all variants instead of
penalising whichever ran during them.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_details() -> dict[str, Any]:
    """CPU family/model numbers, cache size and the vector ISA extensions that matter for matmuls."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = (x.strip() for x in line.split(":", 1))
                    fields.setdefault(k, v)
                elif fields:
                    break
    except OSError:
        return {}
    flags = set(fields.get("flags", "").split())
    isa = [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16") if x in flags]
    return {"cpu_family": fields.get("cpu family"), "cpu_model_number": fields.get("model"),
            "cpu_mhz": fields.get("cpu MHz"), "cache_size": fields.get("cache size"), "isa": isa,
            "hypervisor": "hypervisor" in flags}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch/deepspeed/transformers versions, torch threads, load average now."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        **cpu_details(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_1_5_15": loadavg(),
    }
    for name in ("deepspeed", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - an optional dependency that does not import
            info[name] = None
    return info


def summarize(times_s: Sequence[float]) -> dict[str, float]:
    ms = [t * 1e3 for t in times_s]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "repeats": len(ms)}


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int = 1, repeats: int = 5,
                     budget_s: float | None = None, min_repeats: int = 3,
                     sync: Callable[[], None] | None = None) -> dict[str, dict[str, float]]:
    """Time each callable, interleaved round-robin; returns {name: summarize(...)}.

    `warmup` untimed rounds first. Then up to `repeats` timed rounds; with `budget_s`, rounds stop
    once the budget is spent and at least `min_repeats` rounds are done.
    """
    sync = sync or (lambda: None)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
        if budget_s is not None and r + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return {n: summarize(v) for n, v in times.items()}


def fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    align = align or "".join("l" if i == 0 else "r" for i in range(len(headers)))
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def target(name: str, value: float | None, threshold: float, op: str, unit: str = "", bound: str = "",
           value_min: float | None = None) -> dict:
    """One target row: met when `value op threshold` (op is '>=' or '<='). `value` comes from the
    medians; `value_min`, where given, is the same figure from the fastest repeats (less exposed to
    other load on a shared machine), shown beside it."""
    met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"target": name, "value": value, "value_min": value_min, "threshold": threshold, "op": op, "unit": unit,
            "met": met, "bound": "" if met else bound}
