"""GPU paths that cannot work are refused before any compute, with one line naming the key to change
(`tcd_ds.train.check_gpu_paths`, called by `load_ds_config`, where the device is known). The device is
faked (a `torch.device("cuda")` passed in): the checks look at the config, not at a GPU.
Also the MegaBlocks adapter against a router that returns top-1 indices as [T]."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from tcd_ds.config import ConfigError, MoEConfig, build_config
from tcd_ds.model.experts.dropless import MegaBlocksMoE
from tcd_ds.model.routing import Router, balance_loss
from tcd_ds.train import load_ds_config

from trainer_utils import REPO

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
DS = REPO / "ds_configs"
ON_CPU = ("model.moe.backend=megablocks needs an NVIDIA GPU and this run is on cpu: set model.moe.backend=grouped "
          "(dropless grouped matmuls) or torch")
NOT_INSTALLED = ("model.moe.backend=megablocks needs the megablocks package, which is not installed: pip install -r "
                 "requirements-gpu.txt, or set model.moe.backend=grouped")


def _not_bf16(path, precision: str) -> str:
    return (f"{path}: model.moe.backend=megablocks runs MegaBlocks' grouped GEMMs, which take bf16 only, but this "
            f"config trains in {precision}: enable \"bf16\" in the DeepSpeed config (e.g. "
            "ds_configs/gpu_zero2_bf16.json) or set model.moe.backend=grouped")


def _cfg(backend: str, mode: str = "moe"):
    return build_config("tiny", [f"mode={mode}", f"model.moe.backend={backend}"])


@pytest.fixture
def megablocks_installed(monkeypatch):
    """find_spec('megablocks') answers as if the package were installed (it is not on this machine)."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "megablocks":
            return importlib.machinery.ModuleSpec("megablocks", None)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.fixture
def megablocks_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "megablocks" else real(name, *a, **k))


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_megablocks_refused_on_cpu():
    with pytest.raises(ConfigError) as exc:
        load_ds_config(str(DS / "cpu_zero2_bf16.json"), _cfg("megablocks"), CPU)
    assert _one_line(exc) == ON_CPU


def test_megablocks_refused_when_not_installed(megablocks_missing):
    with pytest.raises(ConfigError) as exc:
        load_ds_config(str(DS / "gpu_zero2_bf16.json"), _cfg("megablocks"), CUDA)
    assert _one_line(exc) == NOT_INSTALLED


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_megablocks_refused_without_bf16(megablocks_installed, precision, tmp_path):
    if precision == "fp16":
        path = DS / "gpu_zero2_fp16.json"
    else:  # a GPU config with neither bf16 nor fp16: fp32
        ds = json.loads((DS / "gpu_zero2_bf16.json").read_text())
        del ds["bf16"]
        path = tmp_path / "gpu_zero2_fp32.json"
        path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError) as exc:
        load_ds_config(str(path), _cfg("megablocks"), CUDA)
    assert _one_line(exc) == _not_bf16(path, precision)


def test_megablocks_with_bf16_on_gpu_passes_the_check(megablocks_installed):
    ds = load_ds_config(str(DS / "gpu_zero2_bf16.json"), _cfg("megablocks"), CUDA)
    assert ds["bf16"]["enabled"]


def test_vanilla_mode_ignores_the_moe_backend():
    # vanilla trains the dense model: the MoE backend is never built, so nothing is refused
    load_ds_config(str(DS / "cpu_zero2.json"), _cfg("megablocks", "vanilla"), CPU)


@pytest.mark.parametrize("ds_file", ["gpu_zero2_fp16.json", "gpu_zero2_bf16.json"])
def test_grouped_is_not_refused_on_cuda(ds_file, tmp_path):
    """torch 2.13's grouped_mm takes fp32, bf16 and fp16 on CUDA (fp16/fp32 on its per-group fallback):
    grouped + fp16 / fp32 on a GPU is allowed (checked on a GPU by `python -m tcd_ds.gpucheck`)."""
    load_ds_config(str(DS / ds_file), _cfg("grouped"), CUDA)
    ds = json.loads((DS / "gpu_zero2_bf16.json").read_text())
    del ds["bf16"]
    (tmp_path / "fp32.json").write_text(json.dumps(ds))
    load_ds_config(str(tmp_path / "fp32.json"), _cfg("grouped"), CUDA)


@pytest.mark.slow
@pytest.mark.multiproc
def test_trainer_refuses_megablocks_on_cpu_before_any_compute(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "tcd_ds.train", "--config", "tiny", "--mode", "moe", "--deepspeed_config",
           "ds_configs/cpu_zero2.json", "model.moe.backend=megablocks", f"run_dir={run}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {ON_CPU}"
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [f"error: {ON_CPU}"]
    assert not run.exists()  # refused before the run dir or any data was touched


# --------------------------------------------------------------------------- megablocks' top-1 shape

class _SqueezingRouter(nn.Module):
    """MegaBlocks' LearnedRouter as some releases have it: softmax, max(keepdim) and then, for top-1,
    `expert_indices.squeeze(-1)`: indices [T], weights [T, 1]."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(weight)

    def forward(self, x):
        scores = self.layer(x.view(-1, x.shape[-1])).softmax(dim=-1)
        weights, indices = scores.max(dim=-1, keepdim=True)
        return scores, weights, indices.squeeze(-1)


class _FakeDMoE(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.router = _SqueezingRouter(weight)

    def forward(self, x):
        self.router(x)
        return 2 * x


def test_megablocks_adapter_takes_top1_indices_of_shape_T():
    moe = MoEConfig(num_experts=4, top_k=1, aux_loss_weight=0.01, z_loss_weight=0.1, backend="megablocks")
    ref = Router(8, moe)
    layer = MegaBlocksMoE.__new__(MegaBlocksMoE)  # its constructor needs a GPU and megablocks
    nn.Module.__init__(layer)
    layer.cfg, layer.num_experts = moe, 4
    layer.dmoe = _FakeDMoE(ref.weight.detach())
    x = torch.randn(3, 5, 8)
    y, stats = layer(x)
    routing = ref(x.reshape(-1, 8))
    torch.testing.assert_close(y, 2 * x)
    assert torch.equal(stats.counts, torch.bincount(routing.expert.reshape(-1), minlength=4))
    torch.testing.assert_close(stats.balance_loss, balance_loss(routing.probs, routing.expert[:, 0]))
    assert stats.z_loss > 0
