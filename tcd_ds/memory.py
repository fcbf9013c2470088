"""A per-rank memory plan: parameters, gradients, optimizer state, activations, teacher replica.

Estimates (GiB per rank), printed by the trainer at start and by
`python -m tcd_ds.memory --config large --world 16 [--zero 2] [--dtype bf16] [key=value ...]`:

- weights: every rank holds all non-expert weights and its E/ep_size experts, in the training dtype;
- gradients: the same count in the training dtype, partitioned by ZeRO-2 over the data-parallel
  ranks (non-expert) and the expert-data-parallel ranks (world/ep_size, experts); ZeRO-1 keeps them whole;
- optimizer: Adam's fp32 master weights + two moments (12 bytes a parameter), partitioned by
  ZeRO-1/2 the same way;
- activations: the standard per-layer estimate for a post-LN Transformer layer with a fused
  (memory-efficient) attention kernel, `34 * B * S * H` bytes in 16-bit (doubled in fp32), with the
  FFN part scaled by top_k in MoE layers, plus the MLM head on the masked tokens (fp32 logits);
- teacher: its weights in its own dtype plus the tapped tensors kept for the relation losses
  (T, I, A: 6 tensors of B*S*H per layer).
It ignores allocator fragmentation, communication buffers and the CUDA context (add ~10-20%).
"""
from __future__ import annotations

import dataclasses

from tcd_ds.cli import Parser, exit_on, fail
from tcd_ds.config import ConfigError, ModelConfig, MoEConfig, build_config

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GIB = 1024 ** 3


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(non-expert parameters, expert parameters over all experts)."""
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    positions = cfg.max_position if cfg.position_encoding == "absolute" else 0  # rotary: no table
    embeddings = (v + positions + cfg.type_vocab_size) * h + 2 * h
    attention = 4 * h * h + 4 * h + 2 * h
    ffn = 2 * h * f + f + h
    head = h * h + h + 2 * h + v
    dense, experts = embeddings + head, 0
    for i in range(cfg.num_layers):
        dense += attention + 2 * h
        if cfg.is_moe_layer(i):
            dense += h * cfg.moe.num_experts  # the router
            experts += cfg.moe.num_experts * ffn
        else:
            dense += ffn
    return dense, experts


def memory_plan(cfg: ModelConfig, micro_batch: int, seq_len: int, world: int, zero_stage: int = 2,
                dtype: str = "bf16", teacher: ModelConfig | None = None, teacher_dtype: str = "fp16",
                masked_fraction: float = 0.15) -> dict[str, float]:
    """GiB per rank for each part, and the total."""
    ep = cfg.moe.ep_size if cfg.moe.num_experts else 1
    dense, experts = parameter_counts(cfg)
    local_experts = experts // ep
    w = BYTES[dtype]
    dp, edp = world, max(1, world // ep)
    grad_div = (dp, edp) if zero_stage >= 2 else (1, 1)
    opt_div = (dp, edp) if zero_stage >= 1 else (1, 1)
    b, s, h = micro_batch, seq_len, cfg.hidden_size
    act_scale = w / 2
    per_layer = []
    for i in range(cfg.num_layers):
        k = cfg.moe.top_k if cfg.is_moe_layer(i) else 1
        attn_part, ffn_part = 11 * b * s * h, 23 * b * s * h  # of the 34*BSH: attention vs FFN + norms
        per_layer.append((attn_part + ffn_part * k) * act_scale)
    head = masked_fraction * b * s * (cfg.vocab_size * 4 + h * 2 * w)
    plan = {
        "weights": (dense + local_experts) * w,
        "gradients": (dense / grad_div[0] + local_experts / grad_div[1]) * w,
        "optimizer": 12 * (dense / opt_div[0] + local_experts / opt_div[1]),
        "activations": sum(per_layer) + head,
        "teacher": 0.0,
    }
    if teacher is not None:
        t_dense, _ = parameter_counts(teacher)
        plan["teacher"] = t_dense * BYTES[teacher_dtype] + 6 * teacher.num_layers * b * s * teacher.hidden_size * BYTES[
            teacher_dtype]
    plan = {k: v / GIB for k, v in plan.items()}
    plan["total"] = sum(plan.values())
    plan["parameters_total"] = float(dense + experts)
    plan["parameters_per_rank"] = float(dense + local_experts)
    return plan


def format_plan(plan: dict[str, float]) -> str:
    parts = " + ".join(f"{k} {plan[k]:.2f}" for k in ("weights", "gradients", "optimizer", "activations", "teacher"))
    return (f"memory plan per rank (GiB): {parts} = {plan['total']:.2f} "
            f"({plan['parameters_total'] / 1e6:.0f}M parameters, {plan['parameters_per_rank'] / 1e6:.0f}M on each rank)")


def main(argv: list[str] | None = None) -> dict[str, float]:
    """`python -m tcd_ds.memory`: bad input is one `error:` line and exit status 2 (tcd_ds/cli.py)."""
    p = Parser(prog="python -m tcd_ds.memory", description="per-rank memory plan of a recipe")
    p.add_argument("--config", required=True, help="recipe name (tiny, small, base, large, xl) or YAML/JSON path")
    p.add_argument("--world", type=int, required=True, help="number of ranks (GPUs)")
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3), help="ZeRO stage")
    p.add_argument("--dtype", default="bf16", choices=sorted(BYTES), help="training dtype")
    p.add_argument("--no-teacher", action="store_true", help="leave out the TCD teacher replica")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.moe.ep_size=8 "
                                                "(needs model.moe.backend=deepspeed)")
    args = p.parse_intermixed_args(argv)
    if args.world < 1:
        fail(f"--world must be >= 1, got {args.world}")
    with exit_on(ConfigError, OSError):
        cfg = build_config(args.config, ["mode=moe", *args.overrides])
    if args.world % cfg.model.moe.ep_size:
        fail(f"model.moe.ep_size={cfg.model.moe.ep_size} does not divide --world {args.world}")
    teacher = None if args.no_teacher else dataclasses.replace(cfg.model, moe=MoEConfig())  # same-shape vanilla
    plan = memory_plan(cfg.model, cfg.train.micro_batch_size, cfg.data.max_seq_len, args.world, args.zero,
                       args.dtype, teacher)
    print(format_plan(plan))
    return plan


if __name__ == "__main__":
    main()
