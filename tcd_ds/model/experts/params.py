"""Expert parameters shared by every MoE backend: initial values that depend on the global expert
index only (one generator per expert), and the tags DeepSpeed reads to reduce expert gradients.

The canonical layout every backend converts to and from (see `experts/loop.py`):
    w1 [E, H, F], b1 [E, F], w2 [E, F, H], b2 [E, H]   (expert e: gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e])
"""
from __future__ import annotations

import torch
from torch import nn


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


def tag_expert_params(module: nn.Module, ep_size: int, active_fraction: float) -> None:
    """Mark expert parameters the way DeepSpeed expects (`allreduce=False`, `group_name`), so their
    gradients are reduced over the expert-data-parallel group, not the whole world."""
    for p in module.parameters():
        p.allreduce = False
        p.group_name = f"ep_size_{ep_size}"
        p.active_fraction = active_fraction
