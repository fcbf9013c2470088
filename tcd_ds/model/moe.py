"""The MoE FFN: one interface over the expert backends (`model.moe.backend`, registered by name in
`tcd_ds/model/experts/registry.py`).

Every backend is an `nn.Module` whose `forward(x [B, S, H])` returns `(y [B, S, H], MoEStats)`:

- `torch` (reference) and `grouped` share `MoELayer` below: our router, a dispatch plan that sorts
  token assignments by expert, and an expert bank that differs only in how it multiplies
  (`experts/loop.py`: a loop over experts; `experts/grouped.py`: one `grouped_mm`);
- `deepspeed` (`experts/expert_parallel.py`) wraps `deepspeed.moe.layer.MoE` (its own gate, expert
  parallelism over `ep_size`);
- `megablocks` (`experts/dropless.py`) wraps MegaBlocks' dropless dMoE (GPU only, imported lazily).

The pieces every backend shares live where each of them imports them (so no backend imports this
module): the router, its losses, capacity and the dispatch plan in `tcd_ds/model/routing.py` (with
the conventions every backend follows), expert initialisation and DeepSpeed's parameter tags in
`tcd_ds/model/experts/params.py`.
"""
from __future__ import annotations

import torch
from torch import nn

from tcd_ds.config import ModelConfig
from tcd_ds.model.experts import registry
from tcd_ds.model.experts.grouped import GroupedExperts
from tcd_ds.model.experts.loop import Experts
from tcd_ds.model.experts.params import tag_expert_params
from tcd_ds.model.routing import MoEStats, Router, capacity, plan_dispatch, router_stats


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

    def route_hook(self, fn):
        """Call `fn(expert [T, k])` on every routing (gpucheck compares routes); returns the hook handle."""
        return self.router.register_forward_hook(lambda module, args, out: fn(out.expert))


def build_loop(cfg: ModelConfig) -> MoELayer:
    """The `torch` backend (reference): our router and a loop over experts."""
    return _with_experts(cfg, Experts(cfg.moe.num_experts, cfg.hidden_size, cfg.intermediate_size))


def build_grouped(cfg: ModelConfig) -> MoELayer:
    """The `grouped` backend: our router and one `grouped_mm` per projection."""
    return _with_experts(cfg, GroupedExperts(cfg.moe.num_experts, cfg.hidden_size, cfg.intermediate_size))


def _with_experts(cfg: ModelConfig, experts: nn.Module) -> MoELayer:
    tag_expert_params(experts, 1, cfg.moe.top_k / cfg.moe.num_experts)
    return MoELayer(cfg, experts)


def build_moe(cfg: ModelConfig) -> nn.Module:
    """The MoE FFN for `cfg.moe.backend`, built without touching the global RNG.

    The backends' constructors draw different amounts from it (our router and expert bank, DeepSpeed's
    `nn.Linear`s, MegaBlocks' own init), and every later draw (`init_weights` of the layers that
    follow, this layer's own `reset_expert_parameters`) would shift with them: the same seed would
    build different non-expert weights under each backend. The constructor's values are only a finite
    start (`init_weights` redraws them all), so it runs on a forked RNG that is put back afterwards."""
    with torch.random.fork_rng(devices=[]):
        return registry.get(cfg.moe.backend).build(cfg)
