"""What this machine's CPU does fast: its ISA flags, and whether bf16 matmuls are native.

bf16 is a speed-up on CPUs with bf16 dot-product instructions (AVX512-BF16 on AMD Zen 4 and Intel
Cooper Lake and later, AMX-BF16 on Sapphire Rapids) and a collapse without them: on an AVX2-only AMD
EPYC (Zen 2) a 2048^3 bf16 matmul ran at 0.24 GFLOP/s against 57 GFLOP/s in fp32 (2 threads), while
an AVX512-BF16 EPYC ran 406 against 151. The CPU configs therefore choose by these flags.
"""
from __future__ import annotations

import functools
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPU_FP32_CONFIG = "ds_configs/cpu_zero2.json"
CPU_BF16_CONFIG = "ds_configs/cpu_zero2_bf16.json"


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


def cpu_ds_config(flags: frozenset[str] | None = None) -> str:
    """The faster CPU DeepSpeed config for this CPU: bf16 where native, fp32 otherwise."""
    return CPU_BF16_CONFIG if cpu_bf16_native(flags) else CPU_FP32_CONFIG


def bf16_warning(flags: frozenset[str] | None = None) -> str | None:
    """One line for a CPU run in bf16 on a CPU without native bf16, else None."""
    if cpu_bf16_native(flags):
        return None
    return ("warning: this CPU has no bf16 matmul instructions (" + "/".join(BF16_FLAGS) + "): bf16 runs "
            f"emulated, often 10-200x slower than fp32; use {CPU_FP32_CONFIG} here")
