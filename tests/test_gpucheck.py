"""`python -m tcd_ds.gpucheck`'s CPU parts (what CI can run of the GPU check): the whole CPU plan
through the command line, and that its checks catch what they are there to catch."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tcd_ds import gpucheck
from tcd_ds.model.experts.grouped import GroupedExperts

from trainer_utils import REPO

CPU = torch.device("cpu")


@pytest.mark.slow
@pytest.mark.multiproc
def test_cpu_plan_runs_every_check_and_exits_0(tmp_path):
    out = tmp_path / "gpucheck.json"
    proc = subprocess.run([sys.executable, "-m", "tcd_ds.gpucheck", "--cpu", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours = [ln for ln in proc.stdout.splitlines() if ln.startswith("gpucheck: ")]  # (DeepSpeed logs to stdout too)
    assert ours[0] == ("gpucheck: --cpu: running the CPU parts at small sizes, not the GPU checks"
                       if torch.cuda.is_available() else "gpucheck: no GPU here (torch.cuda.is_available() is False): "
                       "the GPU checks are not run; running their CPU parts at small sizes")
    res = json.loads(out.read_text())
    assert res["failures"] == []
    results = res["results"]
    assert set(results) == {"backends/fp32/top1", "backends/fp32/top2", "backends/bf16/grouped", "teacher/bf16",
                            "tcd_steps/bf16/torch", "tcd_steps/bf16/grouped", "tcd_steps/bf16/deepspeed",
                            "throughput/torch"}
    rel_tol = gpucheck.TOLERANCES[torch.float32][0]
    for k in (1, 2):
        errors = results[f"backends/fp32/top{k}"]
        assert set(errors) == {"grouped", "deepspeed"}  # megablocks: skipped without a GPU
        assert all(v <= rel_tol for e in errors.values() for v in e.values())
    assert "megablocks skipped (needs an NVIDIA GPU)" in proc.stdout
    assert results["teacher/bf16"]["relation_max_error"] > 0  # a bf16 teacher really ran
    for backend in ("torch", "grouped", "deepspeed"):
        steps = results[f"tcd_steps/bf16/{backend}"]
        assert steps["skipped"] == 0
        for k in ("loss", "mlm", "L_T", "L_I", "L_A"):
            assert steps["last"][k] < steps["first"][k], (backend, k)
    tp = results["throughput/torch"]
    assert tp["moe"]["tokens_per_second"] > 0 and 0 < tp["tcd"]["mfu"] < 1
    assert tp["tcd"]["median_ms"] > tp["moe"]["median_ms"] * 0.5
    assert "gpucheck: 8 checks passed, 0 failed" in proc.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_check_catches_a_wrong_backend(monkeypatch, dtype):
    kw = dict(experts=4, hidden=16, ffn=32, tokens=(3, 10), backends=("grouped",), log=lambda line: None)
    assert set(gpucheck.check_backends(CPU, dtype, **kw)) >= {"grouped"}
    forward = GroupedExperts.forward
    # 1 % off: what a wrong kernel, layout or dtype would give (tolerances: fp32 2e-5, bf16 2e-2 relative)
    scale = 1.01 if dtype == torch.float32 else 1.05
    monkeypatch.setattr(GroupedExperts, "forward", lambda self, *a: forward(self, *a) * scale)
    with pytest.raises(AssertionError, match=r"grouped differs from the torch backend .* in y: relative error"):
        gpucheck.check_backends(CPU, dtype, **kw)


def test_backend_check_catches_a_wrong_gradient(monkeypatch):
    kw = dict(experts=4, hidden=16, ffn=32, tokens=(3, 10), backends=("grouped",), log=lambda line: None)
    forward = GroupedExperts.forward

    def forward_wrong_grad(self, *a):  # same output, gradient into the experts' input doubled
        out = forward(self, *a)
        if out.requires_grad:
            out.register_hook(lambda g: 2 * g)
        return out

    monkeypatch.setattr(GroupedExperts, "forward", forward_wrong_grad)
    with pytest.raises(AssertionError, match=r"grouped differs from the torch backend .* in dx"):
        gpucheck.check_backends(CPU, torch.float32, **kw)


def test_teacher_check_catches_relations_beyond_tolerance(monkeypatch):
    monkeypatch.setitem(gpucheck.TEACHER_TOLERANCES, torch.bfloat16, (1e-6, 1.0))
    with pytest.raises(AssertionError, match=r"the bf16 teacher's relations differ from the fp32 teacher's by"):
        gpucheck.check_teacher_dtypes(CPU, torch.bfloat16, "tiny", (2, 32), log=lambda line: None)


def test_rel_errors():
    ref = torch.tensor([3.0, -4.0])
    assert gpucheck.rel_errors(ref, ref) == (0.0, 0.0)
    rel, mx = gpucheck.rel_errors(torch.tensor([3.0, -3.0]), ref)
    assert rel == pytest.approx(1 / 5) and mx == pytest.approx(1 / 4)
