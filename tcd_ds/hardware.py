"""What this machine's CPU does fast: its ISA flags, and whether bf16 matmuls are native.

bf16 is a speed-up on CPUs with bf16 dot-product instructions (AVX512-BF16 on AMD Zen 4 and Intel
Cooper Lake and later, AMX-BF16 on Sapphire Rapids) and a collapse without them: on an AVX2-only AMD
EPYC (Zen 2) a 2048^3 bf16 matmul ran at 0.24 GFLOP/s against 57 GFLOP/s in fp32 (2 threads), while
an AVX512-BF16 EPYC ran 406 against 151. The CPU configs therefore choose by these flags, and by
the model and the world size (measured by `python -m tcd_ds.bench --only trainer`, docs/performance.md):
- MoE models on the torch and grouped backends run in fp32 on AMX CPUs: there, under DeepSpeed's bf16
  engine, the MoE step was 1.6-1.8x
  slower than in fp32 (small, 1 rank x 1 thread, Sapphire Rapids-class Xeon: 64 experts 3.7 k against
  6.8 k tok/s, 8 experts 5.8 k against 9.4 k) while the dense one was 8 % faster (11.8 k against
  10.9 k); on an AVX512-BF16 EPYC without AMX bf16 was the faster for both (MoE 4.5 k against 3.6 k,
  2 ranks, README), so there MoE keeps bf16;
- one rank runs without ZeRO (stage 0): partitioning buys nothing there, and its flat fp32 copies,
  bookkeeping and norm cost the 64-expert step 0.2 s (1.28 against 1.08 s in bf16, 0.79 against 0.60
  s in fp32).
"""
from __future__ import annotations

import functools
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPU_FP32_CONFIG = "ds_configs/cpu_zero2.json"
CPU_BF16_CONFIG = "ds_configs/cpu_zero2_bf16.json"
CPU_FP32_ONE_RANK = "ds_configs/cpu_zero0.json"
CPU_BF16_ONE_RANK = "ds_configs/cpu_zero0_bf16.json"


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first processor's `flags` in /proc/cpuinfo (empty where there is no such file)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_bf16_native(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU has bf16 matmul instructions (False where the flags cannot be read)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def cpu_ds_config(flags: frozenset[str] | None = None, moe: bool = False, ranks: int = 2) -> str:
    """The faster CPU DeepSpeed config for this CPU, model and world size: bf16 where native, except
    for MoE models on AMX CPUs; fp32 otherwise; ZeRO-2 on several ranks, stage 0 on one. `moe`: an
    MoE model whose experts run as many small per-expert matmuls of varying rows on the rank (the
    torch and grouped backends); DeepSpeed-MoE's capacity-padded experts ran faster in bf16 on the
    same AMX CPU (2 ranks, ep_size 2: 4.8 k against 3.3 k tok/s), so the trainer passes False there."""
    flags = cpu_flags() if flags is None else flags
    bf16 = cpu_bf16_native(flags) and not (moe and "amx_bf16" in flags)
    if ranks == 1:
        return CPU_BF16_ONE_RANK if bf16 else CPU_FP32_ONE_RANK
    return CPU_BF16_CONFIG if bf16 else CPU_FP32_CONFIG


def bf16_warning(flags: frozenset[str] | None = None) -> str | None:
    """One line for a CPU run in bf16 on a CPU without native bf16, else None."""
    if cpu_bf16_native(flags):
        return None
    return ("warning: this CPU has no bf16 matmul instructions (" + "/".join(BF16_FLAGS) + "): bf16 runs "
            f"emulated, often 10-200x slower than fp32; use {CPU_FP32_CONFIG} here")
