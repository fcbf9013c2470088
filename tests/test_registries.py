"""The extension points are registries (docs/extending.md): adding an MoE backend or a relation-loss form
is one file plus one `register(...)`, and config validation, the `error:` line listing the choices, the
trainer's checks, gpucheck's list and the relation losses all pick it up."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tcd_ds import gpucheck, memory
from tcd_ds.config import ConfigError, DistillConfig, build_config
from tcd_ds.distill import forms, relation
from tcd_ds.distill.objective import RelationObjective
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

# the one new file of a relation form: the mean absolute difference of the two relation matrices
DUMMY_FORM = '''"""A dummy relation form for tests/test_registries.py."""
from tcd_ds.distill.relation import relation_matrix


def loss(s, t, mask, tau, impl):
    valid = (mask[:, None, :] & mask[:, :, None]).float()
    if s.dim() == 4:
        valid = valid[:, None]
    diff = (relation_matrix(s, mask) - relation_matrix(t, mask)).abs() * valid
    return diff.sum() / valid.expand_as(diff).sum().clamp(min=1.0)
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


@pytest.fixture
def dummy_form(tmp_path, monkeypatch):
    (tmp_path / "dummy_relation_form.py").write_text(DUMMY_FORM)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(forms, "_REGISTRY", dict(forms._REGISTRY))
    forms.register(forms.Form("l1", "dummy_relation_form:loss"))  # the one registration
    return "l1"


def test_the_builtin_forms_are_registered():
    assert forms.names() == ("mse", "kl") and forms.with_impl("gram") == ("mse",)
    with pytest.raises(ConfigError, match="distill.form must be 'mse' or 'kl', got 'l1'"):
        build_config("tiny", ["distill.form=l1"])


def test_config_validation_and_the_error_line_pick_up_a_new_form(dummy_form, capsys):
    cfg = build_config("tiny", ["mode=tcd", "teacher.path=t", f"distill.form={dummy_form}"])
    assert cfg.distill.form == dummy_form
    with pytest.raises(ConfigError, match="distill.impl=gram is only implemented for distill.form=mse; use "
                                          "impl=auto or naive with form=l1"):
        build_config("tiny", [f"distill.form={dummy_form}", "distill.impl=gram"])
    with pytest.raises(SystemExit):
        memory.main(["--config", "tiny", "--world", "2", "distill.form=nope"])
    assert capsys.readouterr().err == "error: distill.form must be 'mse' or 'kl' or 'l1', got 'nope'\n"


def test_the_relation_losses_compute_a_new_form(dummy_form):
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 8, generator=gen), torch.randn(2, 6, 4, generator=gen)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    assert relation.choose_impl(dummy_form, 8, 8, 64) == "naive"
    with pytest.raises(ValueError, match="impl='gram' is only available for form='mse'"):
        relation.choose_impl(dummy_form, 8, 8, 64, "gram")
    one = relation.relation_loss(s, t, mask, form=dummy_form)
    assert one > 0 and relation.relation_loss(s, s * 2.0, mask, form=dummy_form) < 1e-6  # relations are scale-free
    many = relation.relation_losses([s, s[:, :, :4], s], [t, t, s], mask, form=dummy_form)
    torch.testing.assert_close(many[0], one)
    assert many[2] < 1e-6
    # and the trainer's objective, which reaches the forms only through relation_losses
    objective = RelationObjective(DistillConfig(positions="T", form=dummy_form), 1, 1)
    total, terms = objective({("T", 0, "out"): s}, {("T", 0, "out"): t}, mask)
    torch.testing.assert_close(total, one)
