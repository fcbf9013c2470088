"""The CPU's bf16 capability decides the CPU DeepSpeed config (`tcd_ds.hardware`, `ds_config: auto`)."""
from pathlib import Path

import pytest

from tcd_ds import hardware
from tcd_ds.experiments import resolve_ds_config

ZEN2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n\nprocessor\t: 1\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SPR = "processor\t: 0\nflags\t\t: avx2 avx512f amx_tile amx_bf16 amx_int8\n"


def flags_of(tmp_path: Path, text: str) -> frozenset[str]:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return hardware.cpu_flags(str(path))


def test_flags_are_read_from_cpuinfo(tmp_path):
    flags = flags_of(tmp_path, ZEN2)
    assert {"avx2", "fma"} <= flags and "avx512_bf16" not in flags
    assert hardware.cpu_flags(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize("text, native", [(ZEN2, False), (ZEN4, True), (SPR, True), ("", False)])
def test_bf16_config_only_where_native(tmp_path, text, native):
    flags = flags_of(tmp_path, text)
    assert hardware.cpu_bf16_native(flags) is native
    assert hardware.cpu_ds_config(flags) == (hardware.CPU_BF16_CONFIG if native else hardware.CPU_FP32_CONFIG)
    assert (hardware.bf16_warning(flags) is None) is native
    for path in (hardware.CPU_BF16_CONFIG, hardware.CPU_FP32_CONFIG):
        assert (Path(__file__).resolve().parents[1] / path).is_file()


def test_auto_is_chosen_once_per_experiment(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_ds_config", lambda flags=None, **kw: hardware.CPU_BF16_CONFIG)
    chosen, how = resolve_ds_config("auto", tmp_path)
    assert chosen == hardware.CPU_BF16_CONFIG and "chosen for this CPU" in how
    # a later session on a CPU without bf16 continues the experiment as it began
    monkeypatch.setattr(hardware, "cpu_ds_config", lambda flags=None, **kw: hardware.CPU_FP32_CONFIG)
    chosen, how = resolve_ds_config("auto", tmp_path)
    assert chosen == hardware.CPU_BF16_CONFIG and "kept" in how
    fresh = tmp_path / "another-experiment"
    fresh.mkdir()
    assert resolve_ds_config("auto", fresh)[0] == hardware.CPU_FP32_CONFIG
    assert resolve_ds_config("ds_configs/cpu_zero1.json", tmp_path) == ("ds_configs/cpu_zero1.json", "given")


@pytest.mark.parametrize("text, moe, ranks, expected", [
    (SPR, False, 2, hardware.CPU_BF16_CONFIG), (SPR, True, 2, hardware.CPU_FP32_CONFIG),
    (SPR, False, 1, hardware.CPU_BF16_ONE_RANK), (SPR, True, 1, hardware.CPU_FP32_ONE_RANK),
    (ZEN4, True, 2, hardware.CPU_BF16_CONFIG), (ZEN4, True, 1, hardware.CPU_BF16_ONE_RANK),
    (ZEN2, False, 1, hardware.CPU_FP32_ONE_RANK), (ZEN2, True, 2, hardware.CPU_FP32_CONFIG)])
def test_auto_config_by_cpu_model_and_world_size(tmp_path, text, moe, ranks, expected):
    """MoE models in fp32 on AMX CPUs (bf16 measured slower there), one rank without ZeRO."""
    assert hardware.cpu_ds_config(flags_of(tmp_path, text), moe=moe, ranks=ranks) == expected
    ds = (Path(__file__).resolve().parents[1] / expected).read_text()
    assert ('"stage": 0' in ds) is (ranks == 1) and ('"bf16"' in ds) is ("bf16" in expected)


def test_the_trainer_and_the_experiments_pass_the_model_and_world_size(tmp_path, monkeypatch):
    import torch

    from tcd_ds.config import build_config
    from tcd_ds.train import load_ds_config

    seen = []
    monkeypatch.setattr(hardware, "cpu_ds_config", lambda flags=None, **kw: seen.append(kw) or hardware.CPU_FP32_CONFIG)
    load_ds_config("auto", build_config("tiny", ["mode=moe"]), torch.device("cpu"), 1)
    load_ds_config("auto", build_config("tiny", ["mode=vanilla"]), torch.device("cpu"), 4)
    resolve_ds_config("auto", tmp_path, 1)
    assert seen == [{"moe": True, "ranks": 1}, {"moe": False, "ranks": 4}, {"moe": True, "ranks": 1}]


def test_teacher_auto_dtype_on_cpu_follows_native_bf16(monkeypatch):
    import torch

    from tcd_ds.distill import teacher

    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(hardware, "cpu_bf16_native", lambda flags=None, n=native: n)
        assert teacher.resolve_dtype("auto", torch.device("cpu")) == dtype
