"""Routing shared by every MoE backend: the router, its losses and load statistics, capacity, and
the dispatch plan that sorts token assignments by expert.

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

Backends that bring their own gate (`experts/expert_parallel.py`, `experts/dropless.py`) report
their routing through `MoEStats` computed with the same losses.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tcd_ds.config import MoEConfig


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
