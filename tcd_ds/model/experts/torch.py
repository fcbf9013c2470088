"""The reference expert bank: stacked expert weights and a plain loop over experts.

Tokens arrive already sorted by expert (see `tcd_ds.model.moe.plan_dispatch`), so each expert
multiplies one contiguous slice: the loop is over experts, never over tokens. The weights are the
canonical layout every backend converts to and from:
    w1 [E, H, F], b1 [E, F], w2 [E, F, H], b2 [E, H]   (expert e: gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        e, h, f = num_experts, hidden_size, intermediate_size
        self.w1 = nn.Parameter(torch.empty(e, h, f))
        self.b1 = nn.Parameter(torch.zeros(e, f))
        self.w2 = nn.Parameter(torch.empty(e, f, h))
        self.b2 = nn.Parameter(torch.zeros(e, h))
        self.reset_parameters(0.02)

    def reset_parameters(self, std: float) -> None:
        for w in (self.w1, self.w2):
            nn.init.normal_(w, std=std)
        for b in (self.b1, self.b2):
            nn.init.zeros_(b)

    def forward(self, x: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, H] sorted by `expert` [N]; `counts` [E] rows per expert. Returns [N, H]."""
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                h = F.gelu(torch.addmm(self.b1[e], x[start:start + n], self.w1[e]))
                outs.append(torch.addmm(self.b2[e], h, self.w2[e]))
                start += n
        return torch.cat(outs) if outs else x.new_zeros(0, self.w2.shape[-1])
