"""Forward-hook taps on the three TCD positions of any BERT (ours or `transformers`').

Both models use Hugging Face's module names, so one walk finds every position:

| position | layer | name  | module                                   | captured shape      |
|----------|-------|-------|------------------------------------------|---------------------|
| T        | 0     | out   | `bert.embeddings`                        | [B, S, H]           |
| T        | i     | out   | `bert.encoder.layer[i-1]`                | [B, S, H]           |
| I        | i     | attn  | `...attention.output.dense`              | [B, S, H]           |
| I        | i     | ffn   | `...output.dense`, or `...moe` (MoE FFN) | [B, S, H]           |
| A        | i     | q/k/v | `...attention.self.query/key/value`      | [B, heads, S, dim]  |

Nothing is copied: A is a view of the projection output. A `Taps` object captures only while it is
armed (`with taps:`), and only the first call of each module in that window, so the re-forward of
non-reentrant activation checkpointing during backward neither overwrites nor duplicates what was
taken. Each `Taps` owns its hooks and its tensors (no global state); `remove()` restores the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

Key = tuple[str, int, str]  # (position, layer, name)


@dataclass(frozen=True)
class TapPoint:
    position: str  # "T", "I" or "A"
    layer: int  # 0 = embeddings (T only), 1..n = transformer layers
    name: str  # out | attn | ffn | q | k | v
    module: nn.Module
    heads: int = 0  # > 0: split the last dim into this many heads, [B, heads, S, dim]

    @property
    def key(self) -> Key:
        return (self.position, self.layer, self.name)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    bert = getattr(model, "bert", model)
    return bert.encoder.layer


def num_heads(layer: nn.Module) -> int:
    attn = layer.attention.self
    return getattr(attn, "num_heads", None) or attn.num_attention_heads  # ours, or transformers'


def tap_points(model: nn.Module, positions: str = "TIA", include_embeddings: bool = True,
               num_layers: int | None = None) -> list[TapPoint]:
    """The TCD positions of a BERT (`BertForMaskedLM`/`BertModel`, ours or transformers')."""
    bert = getattr(model, "bert", model)
    points: list[TapPoint] = []
    if "T" in positions and include_embeddings:
        points.append(TapPoint("T", 0, "out", bert.embeddings))
    for i, layer in enumerate(bert.encoder.layer[:num_layers], start=1):
        if "T" in positions:
            points.append(TapPoint("T", i, "out", layer))
        if "I" in positions:
            points.append(TapPoint("I", i, "attn", layer.attention.output.dense))
            ffn = layer.moe if hasattr(layer, "moe") else layer.output.dense
            points.append(TapPoint("I", i, "ffn", ffn))
        if "A" in positions:
            attn, heads = layer.attention.self, num_heads(layer)
            for name, module in (("q", attn.query), ("k", attn.key), ("v", attn.value)):
                points.append(TapPoint("A", i, name, module, heads))
    return points


class Taps:
    """Registers forward hooks on `points`; `with taps:` arms them and clears what was captured."""

    def __init__(self, points: list[TapPoint]):
        self.points = points
        self.captured: dict[Key, torch.Tensor] = {}
        self.armed = False
        self._handles = [p.module.register_forward_hook(self._hook(p)) for p in points]

    def _hook(self, point: TapPoint):
        def hook(module: nn.Module, args, output) -> None:
            if not self.armed or point.key in self.captured:
                return
            t = output[0] if isinstance(output, (tuple, list)) else output
            if point.heads:
                t = t.unflatten(-1, (point.heads, -1)).transpose(1, 2)
            self.captured[point.key] = t

        return hook

    def __enter__(self) -> dict[Key, torch.Tensor]:
        self.captured = {}
        self.armed = True
        return self.captured

    def __exit__(self, *exc) -> None:
        self.armed = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.captured = {}
