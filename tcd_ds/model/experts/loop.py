"""The reference expert bank: stacked expert weights and a plain loop over experts.

Tokens arrive already sorted by expert (see `tcd_ds.model.routing.plan_dispatch`), so each expert
multiplies one contiguous slice: the loop is over experts, never over tokens. The weights are the
canonical layout every backend converts to and from:
    w1 [E, H, F], b1 [E, F], w2 [E, F, H], b2 [E, H]   (expert e: gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tcd_ds.model.experts.params import expert_seed, expert_weights


class _ExpertLoop(torch.autograd.Function):
    """The loop over experts with its backward written out: each expert's rows are one contiguous
    slice of the expert-sorted tokens, and every product writes straight into its slice of one
    preallocated output / gradient (no per-expert temporaries to concatenate or stack). The
    elementwise parts (gelu and its backward) and the bias gradients run once over all rows."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, expert, sizes: list[int]):
        n, f = x.shape[0], w1.shape[-1]
        pre = x.new_empty(n, f)  # x @ w1 + b1, kept for gelu's backward
        out = x.new_empty(n, w2.shape[-1])
        used = [(e, slice(start, start + rows)) for e, rows, start in _segments(sizes) if rows]
        for e, sl in used:
            torch.addmm(b1[e], x[sl], w1[e], out=pre[sl])
        hid = F.gelu(pre)
        for e, sl in used:
            torch.addmm(b2[e], hid[sl], w2[e], out=out[sl])
        ctx.sizes = sizes
        ctx.save_for_backward(x, w1, w2, pre, hid, expert)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, w1, w2, pre, hid, expert = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        grad_out = grad_out.contiguous()
        sizes = ctx.sizes
        used = [(e, slice(start, start + rows)) for e, rows, start in _segments(sizes) if rows]
        dw1 = _zeros_for_unused(w1, sizes) if need_w1 else None
        dw2 = _zeros_for_unused(w2, sizes) if need_w2 else None
        dh = torch.empty_like(pre)
        for e, sl in used:
            if need_w2:
                torch.mm(hid[sl].t(), grad_out[sl], out=dw2[e])
            torch.mm(grad_out[sl], w2[e].t(), out=dh[sl])
        dpre = torch.ops.aten.gelu_backward(dh, pre)
        del dh
        dx = torch.empty_like(x) if need_x else None
        for e, sl in used:
            if need_w1:
                torch.mm(x[sl].t(), dpre[sl], out=dw1[e])
            if need_x:
                torch.mm(dpre[sl], w1[e].t(), out=dx[sl])
        db1 = dpre.new_zeros(w1.shape[0], w1.shape[2]).index_add_(0, expert, dpre) if need_b1 else None
        db2 = grad_out.new_zeros(w2.shape[0], w2.shape[2]).index_add_(0, expert, grad_out) if need_b2 else None
        return dx, dw1, db1, dw2, db2, None, None


def _segments(sizes: list[int]):
    """(expert, rows, first row) of each expert's contiguous slice."""
    start = 0
    for e, rows in enumerate(sizes):
        yield e, rows, start
        start += rows


def _zeros_for_unused(w: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """An uninitialised gradient buffer like `w`, zeroed only for the experts without tokens."""
    grad = torch.empty_like(w)
    for e, rows in enumerate(sizes):
        if not rows:
            grad[e].zero_()
    return grad


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        e, h, f = num_experts, hidden_size, intermediate_size
        self.w1 = nn.Parameter(torch.empty(e, h, f))
        self.b1 = nn.Parameter(torch.zeros(e, f))
        self.w2 = nn.Parameter(torch.empty(e, f, h))
        self.b2 = nn.Parameter(torch.zeros(e, h))
        for b in (self.b1, self.b2):  # stacked [E, F] / [E, H] biases: biases for the optimizer (no decay)
            b.tcd_role = "bias"
        self.reset_parameters(0.02)

    def reset_parameters(self, std: float, base_seed: int | None = None) -> None:
        """Expert e gets `expert_weights(base_seed, e, ...)` (base_seed: one draw of the global RNG by
        default), the same weights as expert e of any other backend or expert-parallel size."""
        base_seed = expert_seed() if base_seed is None else base_seed
        with torch.no_grad():
            for e in range(self.w1.shape[0]):
                w1, w2 = expert_weights(base_seed, e, self.w1.shape[1], self.w1.shape[2], std)
                self.w1[e].copy_(w1)
                self.w2[e].copy_(w2)
        for b in (self.b1, self.b2):
            nn.init.zeros_(b)

    def forward(self, x: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, H] sorted by `expert` [N]; `counts` [E] rows per expert. Returns [N, H].

        Expert e computes `gelu(x[rows_e] @ w1[e] + b1[e]) @ w2[e] + b2[e]` on its contiguous slice of
        rows, with the backward written out in `_ExpertLoop` (tested equal to plain autograd through
        the same loop in tests/test_fast_paths.py).
        """
        x = x.contiguous()
        return _ExpertLoop.apply(x, self.w1, self.b1, self.w2, self.b2, expert, counts.tolist())
