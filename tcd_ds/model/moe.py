"""The MoE FFN: router, router losses, capacity, and one interface over the expert backends.

Every backend is an `nn.Module` whose `forward(x [B, S, H])` returns `(y [B, S, H], MoEStats)`:

- `torch` (reference) and `grouped` share `MoELayer` below: our router, a dispatch plan that sorts
  token assignments by expert, and an expert bank that differs only in how it multiplies
  (a loop over experts vs one `grouped_mm`);
- `deepspeed` wraps `deepspeed.moe.layer.MoE` (its own gate, expert parallelism over `ep_size`);
- `megablocks` wraps MegaBlocks' dropless dMoE (GPU only, imported lazily).

Conventions (the same in every backend, so they can be tested equal):
- router in fp32, softmax over all experts, top-k; gates are the chosen probabilities, renormalised
  over the k choices when `normalize_top_k` (DeepSpeed does the same for k >= 2);
- Switch load-balancing loss `E * sum_e f_e * P_e` with f_e the fraction of tokens whose *first*
  choice is e (GShard/DeepSpeed) and P_e the mean router probability;
- router z-loss `mean(logsumexp(logits)^2)` (ST-MoE);
- with `capacity_factor > 0`, capacity `C = max(min_capacity, ceil(cf * T * k / E))` assignments per
  expert; assignments are served in priority order (all first choices in token order, then all
  second choices, ...) and those beyond C are dropped: they add nothing, so a token whose every
  assignment is dropped passes through on the residual path alone. Padding tokens are routed
  like any other token (as in DeepSpeed), a documented choice.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tcd_ds.config import ModelConfig, MoEConfig


class MoEStats(NamedTuple):
    loss: torch.Tensor  # aux_loss_weight * balance + z_loss_weight * z: what joins the objective
    balance_loss: torch.Tensor  # unweighted Switch load-balancing loss
    z_loss: torch.Tensor  # unweighted router z-loss (0 when disabled)
    counts: torch.Tensor  # [E] assignments routed to each expert, before dropping (detached)
    dropped: torch.Tensor  # fraction of assignments dropped for capacity (detached)


class Routing(NamedTuple):
    expert: torch.Tensor  # [T, k] chosen experts
    gate: torch.Tensor  # [T, k] their weights (fp32)
    probs: torch.Tensor  # [T, E] fp32 softmax
    logits: torch.Tensor  # [T, E] fp32


class Dispatch(NamedTuple):
    token: torch.Tensor  # [N] token index of each kept assignment, sorted by expert
    expert: torch.Tensor  # [N] its expert (non-decreasing)
    gate: torch.Tensor  # [N] its gate value
    counts: torch.Tensor  # [E] kept assignments per expert
    dropped: torch.Tensor  # scalar: fraction of assignments dropped


def balance_loss(probs: torch.Tensor, first_choice: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss: E * sum_e (fraction routed to e) * (mean probability of e)."""
    num_experts = probs.shape[-1]
    fraction = torch.bincount(first_choice, minlength=num_experts).to(probs.dtype) / first_choice.numel()
    return num_experts * torch.sum(fraction * probs.mean(0))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1).square().mean()


def router_stats(routing: Routing, cfg: MoEConfig, dropped: torch.Tensor) -> MoEStats:
    """The router losses and load statistics of one routing decision."""
    bal = balance_loss(routing.probs, routing.expert[:, 0])
    z = z_loss(routing.logits) if cfg.z_loss_weight > 0 else bal.new_zeros(())
    counts = torch.bincount(routing.expert.reshape(-1), minlength=cfg.num_experts).detach()
    return MoEStats(cfg.aux_loss_weight * bal + cfg.z_loss_weight * z, bal, z, counts, dropped.detach())


def capacity(num_tokens: int, cfg: MoEConfig, training: bool) -> int | None:
    """Per-expert capacity in assignments, or None when dropless."""
    factor = cfg.capacity_factor if training else cfg.eval_capacity_factor
    if factor <= 0:
        return None
    return max(cfg.min_capacity, math.ceil(factor * num_tokens * cfg.top_k / cfg.num_experts))


def expert_seed() -> int:
    """One draw from the global torch RNG: the base seed of one MoE layer's experts.

    Every rank draws it alike (they seed identically), whatever `ep_size`, so expert `e` of the layer
    comes from its own generator seeded `base + e` and is the same whichever rank builds it."""
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))


def expert_weights(base_seed: int, expert: int, hidden_size: int, intermediate_size: int, std: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial canonical weights of global expert `expert`: `w1 [H, F]`, `w2 [F, H]`, normal(0, std) in fp32
    from a generator of its own (so they depend on the expert's global index only, not on which rank,
    backend or expert-parallel size builds it)."""
    gen = torch.Generator().manual_seed(base_seed + expert)
    w1 = torch.empty(hidden_size, intermediate_size).normal_(0.0, std, generator=gen)
    w2 = torch.empty(intermediate_size, hidden_size).normal_(0.0, std, generator=gen)
    return w1, w2


class Router(nn.Module):
    """Linear gate in fp32 with optional multiplicative jitter (training only) and top-k.

    The weight is initialised normal(0, std) here, so a layer built and used without `init_weights`
    never routes on uninitialised memory."""

    def __init__(self, hidden_size: int, cfg: MoEConfig, std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))
        nn.init.normal_(self.weight, std=std)

    def forward(self, x: torch.Tensor) -> Routing:
        x = x.float()
        if self.training and self.cfg.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.cfg.jitter, 1.0 + self.cfg.jitter)
        logits = F.linear(x, self.weight.float())
        probs = logits.softmax(dim=-1)
        gate, expert = probs.topk(self.cfg.top_k, dim=-1)
        if self.cfg.top_k > 1 and self.cfg.normalize_top_k:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        return Routing(expert, gate, probs, logits)


def plan_dispatch(routing: Routing, num_experts: int, cap: int | None) -> Dispatch:
    """Sort assignments by expert (stable, in priority order) and drop those beyond capacity."""
    num_tokens, k = routing.expert.shape
    expert = routing.expert.t().reshape(-1)  # slot-major: all first choices, then all second, ...
    gate = routing.gate.t().reshape(-1)
    token = torch.arange(num_tokens, device=expert.device).repeat(k)
    expert, order = torch.sort(expert, stable=True)
    token, gate = token[order], gate[order]
    counts = torch.bincount(expert, minlength=num_experts)
    if cap is None:
        return Dispatch(token, expert, gate, counts, gate.new_zeros(()))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(expert.numel(), device=expert.device) - starts[expert]
    keep = rank < cap
    dropped = 1.0 - keep.float().mean() if keep.numel() else gate.new_zeros(())
    return Dispatch(token[keep], expert[keep], gate[keep], counts.clamp(max=cap), dropped)


class MoELayer(nn.Module):
    """Router + dispatch + an expert bank (`torch` loop or `grouped` matmul) + weighted combine."""

    def __init__(self, cfg: ModelConfig, experts: nn.Module):
        super().__init__()
        self.cfg = cfg.moe
        self.router = Router(cfg.hidden_size, cfg.moe, cfg.initializer_range)
        self.experts = experts

    def reset_expert_parameters(self, std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        self.experts.reset_parameters(std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.router(x)
        plan = plan_dispatch(routing, self.cfg.num_experts, capacity(x.shape[0], self.cfg, self.training))
        out = self.experts(x.index_select(0, plan.token), plan.expert, plan.counts)  # backward: index_add
        y = torch.zeros_like(x).index_add_(0, plan.token, out * plan.gate.to(out.dtype)[:, None])
        return y.reshape(shape), router_stats(routing, self.cfg, plan.dropped)


def tag_expert_params(module: nn.Module, ep_size: int, active_fraction: float) -> None:
    """Mark expert parameters the way DeepSpeed expects (`allreduce=False`, `group_name`), so their
    gradients are reduced over the expert-data-parallel group, not the whole world."""
    for p in module.parameters():
        p.allreduce = False
        p.group_name = f"ep_size_{ep_size}"
        p.active_fraction = active_fraction


def build_moe(cfg: ModelConfig) -> nn.Module:
    """The MoE FFN for `cfg.moe.backend`."""
    backend = cfg.moe.backend
    if backend in ("torch", "grouped"):
        from tcd_ds.model.experts.grouped import GroupedExperts
        from tcd_ds.model.experts.torch import Experts

        cls = Experts if backend == "torch" else GroupedExperts
        experts = cls(cfg.moe.num_experts, cfg.hidden_size, cfg.intermediate_size)
        tag_expert_params(experts, 1, cfg.moe.top_k / cfg.moe.num_experts)
        return MoELayer(cfg, experts)
    if backend == "deepspeed":
        from tcd_ds.model.experts.deepspeed import DeepSpeedMoE

        return DeepSpeedMoE(cfg)
    if backend == "megablocks":
        from tcd_ds.model.experts.megablocks import MegaBlocksMoE

        return MegaBlocksMoE(cfg)
    raise ValueError(f"unknown MoE backend {backend!r}")
