"""Dropless experts with one grouped matmul per projection (MegaBlocks' idea, no custom build).

Same weights as the reference `Experts`; the loop over experts becomes
`torch.nn.functional.grouped_mm` over the expert-sorted tokens (Hopper GPUs have kernels for it;
torch 2.13 also runs it on CPU in fp32 and bf16). grouped_mm wants 16-byte aligned strides, so the
hidden and intermediate sizes must be multiples of 8.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tcd_ds.model.experts.loop import Experts


def unavailable(device_type: str) -> str | None:
    """Why the grouped backend cannot run here (the registry's probe), or None."""
    return None if hasattr(F, "grouped_mm") else f"torch {torch.__version__} has no grouped_mm"


class GroupedExperts(Experts):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        if hidden_size % 8 or intermediate_size % 8:
            raise ValueError(f"the grouped MoE backend needs hidden_size ({hidden_size}) and intermediate_size "
                             f"({intermediate_size}) to be multiples of 8 (grouped_mm alignment)")
        if not hasattr(F, "grouped_mm"):
            raise RuntimeError(f"the grouped MoE backend needs torch.nn.functional.grouped_mm (torch >= 2.9); "
                               f"this is torch {torch.__version__}")
        super().__init__(num_experts, hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = F.gelu(F.grouped_mm(x, self.w1, offs=offs) + self.b1.index_select(0, expert))
        out = F.grouped_mm(h, self.w2, offs=offs) + self.b2.index_select(0, expert)
        if out.requires_grad:  # grouped_mm's backward rejects stride-0 (expanded) gradients
            out.register_hook(lambda g: g.contiguous())
        return out
