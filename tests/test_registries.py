"""The extension points are registries (docs/extending.md): adding an MoE backend is one file plus one
`register(...)`, and config validation, the `error:` line listing the choices, the trainer's checks and
gpucheck's list all pick it up."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tcd_ds import gpucheck, memory
from tcd_ds.config import ConfigError, build_config
from tcd_ds.model.experts import registry
from tcd_ds.model.moe import build_moe
from tcd_ds.train import load_ds_config

from trainer_utils import REPO

CPU = torch.device("cpu")
BUILTIN = ("torch", "grouped", "deepspeed", "megablocks")

# the one new file: a backend module with its builder (here the torch backend's layer under a new name)
DUMMY_BACKEND = '''"""A dummy MoE backend for tests/test_registries.py."""
from tcd_ds.model.moe import build_loop


def build(cfg):
    return build_loop(cfg)
'''


@pytest.fixture
def dummy_backend(tmp_path, monkeypatch):
    (tmp_path / "dummy_moe_backend.py").write_text(DUMMY_BACKEND)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # undone after the test
    # the one registration: CPU only, fp32 only, no expert parallelism
    registry.register(registry.Backend("dummy", "dummy_moe_backend:build", devices=("cpu",), dtypes=("fp32",)))
    return "dummy"


def test_the_builtin_backends_are_registered_in_order():
    assert registry.names() == BUILTIN
    assert registry.expert_parallel() == ("deepspeed",)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.Backend("torch", "tcd_ds.model.moe:build_loop"))


def test_an_unregistered_backend_is_refused():
    with pytest.raises(ConfigError, match="model.moe.backend must be one of torch, grouped, deepspeed, megablocks, "
                                          "got 'dummy'"):
        build_config("tiny", ["mode=moe", "model.moe.backend=dummy"])


def test_config_validation_and_the_builder_pick_up_a_new_backend(dummy_backend):
    cfg = build_config("tiny", ["mode=moe", f"model.moe.backend={dummy_backend}"])
    layer = build_moe(cfg.student_model())
    y, stats = layer(torch.randn(2, 5, cfg.model.hidden_size))
    assert y.shape == (2, 5, cfg.model.hidden_size) and stats.counts.sum() == 10 * cfg.model.moe.top_k
    with pytest.raises(ConfigError, match="ep_size=2 needs model.moe.backend=deepspeed .backend 'dummy' keeps"):
        build_config("tiny", ["mode=moe", f"model.moe.backend={dummy_backend}", "model.moe.ep_size=2"])


def test_the_error_line_lists_a_new_backend(dummy_backend, capsys):
    with pytest.raises(SystemExit) as exc:
        memory.main(["--config", "tiny", "--world", "2", "model.moe.backend=nope"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("error: model.moe.backend must be one of torch, grouped, deepspeed, "
                                       "megablocks, dummy, got 'nope'\n")


def test_the_trainer_checks_read_a_new_backends_requirements(dummy_backend):
    cfg = build_config("tiny", ["mode=moe", f"model.moe.backend={dummy_backend}"])
    ds = REPO / "ds_configs"
    assert load_ds_config(str(ds / "cpu_zero2.json"), cfg, CPU)["train_micro_batch_size_per_gpu"] > 0
    with pytest.raises(ConfigError) as exc:
        load_ds_config(str(ds / "cpu_zero2_bf16.json"), cfg, CPU)
    assert str(exc.value) == (f"{ds / 'cpu_zero2_bf16.json'}: model.moe.backend=dummy trains in fp32 only, but this "
                              "config trains in bf16: use a DeepSpeed config in fp32")
    with pytest.raises(ConfigError, match="model.moe.backend=dummy needs a CPU and this run is on cuda: "):
        load_ds_config(str(ds / "gpu_zero2_bf16.json"), cfg, torch.device("cuda"))


def test_gpucheck_lists_and_checks_a_new_backend(dummy_backend):
    assert list(gpucheck.available_backends(CPU)) == [*BUILTIN, "dummy"]
    assert gpucheck.available_backends(CPU)["dummy"] is None
    assert gpucheck.available_backends(torch.device("cuda"))["dummy"] == "needs a CPU"
    lines: list[str] = []
    errors = gpucheck.check_backends(CPU, torch.float32, experts=4, hidden=16, ffn=32, tokens=(3, 10),
                                     backends=("dummy",), log=lines.append)
    assert set(errors) == {"dummy"} and max(errors["dummy"].values()) == 0.0  # the torch backend's own layer
    assert any("dummy == torch" in line for line in lines)


@pytest.mark.multiproc
def test_the_config_reads_the_backend_names_without_importing_torch():
    code = "import sys, tcd_ds.config; assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed')]"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
