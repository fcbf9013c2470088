"""The per-rank memory plan: parameter counts against a real model, and how ZeRO/ep split the rest."""
from __future__ import annotations

import pytest

from tcd_ds.config import ModelConfig, MoEConfig
from tcd_ds.memory import GIB, main, memory_plan, parameter_counts
from tcd_ds.model.bert import BertForMaskedLM

SMALL = dict(vocab_size=100, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32, max_position=32)


@pytest.mark.parametrize("moe", [MoEConfig(), MoEConfig(num_experts=4, moe_every=2)])
def test_parameter_counts_match_the_model(moe):
    cfg = ModelConfig(**SMALL, moe=moe)
    model = BertForMaskedLM(cfg)
    dense, experts = parameter_counts(cfg)
    expert_numel = sum(p.numel() for p in model.parameters() if getattr(p, "allreduce", True) is False)
    assert experts == expert_numel
    assert dense + experts == sum(p.numel() for p in model.parameters())


def test_zero_and_expert_parallel_partition_as_documented():
    cfg = ModelConfig(**SMALL, moe=MoEConfig(num_experts=8, ep_size=4, backend="deepspeed"))
    dense, experts = parameter_counts(cfg)
    p2 = memory_plan(cfg, 4, 16, world=8, zero_stage=2, dtype="bf16")
    p0 = memory_plan(cfg, 4, 16, world=8, zero_stage=0, dtype="bf16")
    local = experts / 4  # 2 experts of 8 per rank
    assert p2["weights"] * GIB == pytest.approx((dense + local) * 2)
    assert p2["gradients"] * GIB == pytest.approx((dense / 8 + local / 2) * 2)  # expert-data-parallel = 8 / 4
    assert p2["optimizer"] * GIB == pytest.approx(12 * (dense / 8 + local / 2))
    assert p0["optimizer"] * GIB == pytest.approx(12 * (dense + local))
    assert p2["teacher"] == 0.0
    assert p2["total"] == pytest.approx(sum(p2[k] for k in ("weights", "gradients", "optimizer", "activations",
                                                             "teacher")))


def test_cli_prints_the_plan_for_a_recipe(capsys):
    plan = main(["--config", "base", "--world", "16", "model.moe.ep_size=8", "model.moe.backend=deepspeed"])
    out = capsys.readouterr().out
    assert out.startswith("memory plan per rank (GiB): weights")
    assert plan["teacher"] > 0 and plan["total"] > plan["optimizer"] > 0
