"""The TCD objective: MLM + aux + sum_p weight_p * L_p, every term returned for logging.

L_T, L_I and L_A are each the mean of the relation loss over their tap pairs: for T one per layer
(plus the embedding output as layer 0), for I two per layer (attention and FFN outputs), for A
three per layer (Q, K, V, each per head). When the student and the teacher differ in depth,
student layer i is aligned to teacher layer `uniform_layer_map(...)[i-1] + 1` (TinyBERT's uniform
map); layer 0 maps to layer 0.
"""
from __future__ import annotations

import torch

from tcd_ds.config import DistillConfig, ModelConfig
from tcd_ds.distill.relation import relation_losses, uniform_layer_map
from tcd_ds.distill.taps import Key
from tcd_ds.model.hf import CheckpointError


def check_compatible(student: ModelConfig, teacher: ModelConfig, distill: DistillConfig) -> None:
    """Fail with one line when the teacher cannot be aligned with the student (no silent projection)."""
    if teacher.vocab_size != student.vocab_size:
        raise CheckpointError(f"teacher vocab_size {teacher.vocab_size} != student vocab_size {student.vocab_size}: "
                              "they must share the tokenizer")
    if set(distill.positions) & set("TI") and teacher.hidden_size != student.hidden_size:
        raise CheckpointError(f"teacher hidden_size {teacher.hidden_size} != student hidden_size "
                              f"{student.hidden_size}: T/I relation alignment needs equal widths")
    if "A" in distill.positions and teacher.num_heads != student.num_heads:
        raise CheckpointError(f"teacher num_heads {teacher.num_heads} != student num_heads {student.num_heads}: "
                              "A relation alignment is per head")


class RelationObjective:
    """Maps student taps to teacher taps and reduces them to L_T, L_I, L_A (and per-layer terms)."""

    def __init__(self, cfg: DistillConfig, student_layers: int, teacher_layers: int):
        self.cfg = cfg
        self.layer_map = [0] + [t + 1 for t in uniform_layer_map(student_layers, teacher_layers)]

    @property
    def teacher_layers_needed(self) -> int:
        return max(self.layer_map)

    def __call__(self, student: dict[Key, torch.Tensor], teacher: dict[Key, torch.Tensor],
                 mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (sum_p weight_p * L_p, terms) with terms 'T', 'I', 'A' and e.g. 'T/3', 'A/2/q'.

        All pairs go to one `relation_losses` call, which stacks the same-shape pairs (every T and I
        tap of all layers; every Q/K/V tap) into one batched computation each; the values are those
        of one `relation_loss` call per pair."""
        keys = list(student)
        for position in self.cfg.positions:
            if not any(k[0] == position for k in keys):
                raise ValueError(f"no student taps captured for position {position}")
        pairs_t = [teacher[(position, self.layer_map[layer], name)] for position, layer, name in keys]
        losses = relation_losses([student[k] for k in keys], pairs_t, mask, form=self.cfg.form, tau=self.cfg.tau,
                                 impl=self.cfg.impl)
        detached = losses.detach()
        terms: dict[str, torch.Tensor] = {}
        rows: dict[str, list[int]] = {p: [] for p in self.cfg.positions}
        for i, (position, layer, name) in enumerate(keys):
            rows[position].append(i)
            terms[f"{position}/{layer}" + ("" if name == "out" else f"/{name}")] = detached[i]
        total = mask.new_zeros((), dtype=torch.float32)
        for position, idx in rows.items():
            mean = losses[idx].mean() if len(idx) < len(keys) else losses.mean()
            terms[position] = mean.detach()
            total = total + self.cfg.weight(position) * mean
        return total, terms
