"""The TCD objective: MLM + aux + sum_p weight_p * L_p, every term returned for logging.

L_T, L_I and L_A are each the mean of the relation loss over their tap pairs: for T one per layer
(plus the embedding output as layer 0), for I two per layer (attention and FFN outputs), for A
three per layer (Q, K, V, each per head or relation head). When the student and the teacher differ in depth,
student layer i is aligned to teacher layer `uniform_layer_map(...)[i-1] + 1` (TinyBERT's uniform
map); layer 0 maps to layer 0.

Widths may differ: relations are L x L whatever the feature width, so a wider or narrower teacher
(e.g. a pre-trained `bert-base` for a smaller student) aligns T and I as is. A is per attention head
by default (`distill.relation_heads=0`), which needs equal head counts; with `relation_heads=n` each of
Q, K and V, its heads concatenated (`[B, S, hidden]`), is split into n relation heads of
`hidden / n` features on both sides (MiniLMv2, Wang et al. 2021), so the head counts may differ. With
equal head counts and `n = num_heads` that is the per-head alignment exactly.
"""
from __future__ import annotations

import torch

from tcd_ds.config import DistillConfig, ModelConfig
from tcd_ds.distill.relation import relation_losses, uniform_layer_map
from tcd_ds.distill.taps import Key
from tcd_ds.model.hf import CheckpointError


def aligned_widths(student: ModelConfig, teacher: ModelConfig, distill: DistillConfig) -> dict[str, tuple[int, int]]:
    """(student, teacher) feature width of the relation inputs at each configured position."""
    widths = {p: (student.hidden_size, teacher.hidden_size) for p in "TI" if p in distill.positions}
    if "A" in distill.positions:
        n = distill.relation_heads
        widths["A"] = ((student.hidden_size // n, teacher.hidden_size // n) if n
                       else (student.head_dim, teacher.head_dim))
    return widths


def check_compatible(student: ModelConfig, teacher: ModelConfig, distill: DistillConfig) -> None:
    """Fail with one line when the teacher cannot be aligned with the student (no silent projection)."""
    if teacher.vocab_size != student.vocab_size:
        raise CheckpointError(f"teacher vocab_size {teacher.vocab_size} != student vocab_size {student.vocab_size}: "
                              "they must share the tokenizer")
    n = distill.relation_heads
    if "A" in distill.positions and not n and teacher.num_heads != student.num_heads:
        raise CheckpointError(f"teacher num_heads {teacher.num_heads} != student num_heads {student.num_heads}: "
                              f"A aligns per attention head; set distill.relation_heads to a number of relation "
                              f"heads dividing both hidden sizes ({student.hidden_size}, {teacher.hidden_size})")
    if "A" in distill.positions and n and (student.hidden_size % n or teacher.hidden_size % n):
        raise CheckpointError(f"distill.relation_heads={n} must divide the student hidden_size {student.hidden_size} "
                              f"and the teacher hidden_size {teacher.hidden_size}")
    unequal = [p for p, (ws, wt) in aligned_widths(student, teacher, distill).items() if ws != wt]
    if distill.impl == "gram" and unequal:
        ws, wt = aligned_widths(student, teacher, distill)[unequal[0]]
        raise CheckpointError(f"distill.impl=gram loses precision when widths differ ({unequal[0]}: student {ws}, "
                              f"teacher {wt}); set distill.impl=auto or naive")


def relation_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """A tap `[B, heads, S, dim]` as n relation heads `[B, n, S, heads * dim / n]` (MiniLMv2): the heads
    concatenated per token, then split into n equal parts (views, no copy for a tap of a projection)."""
    b, _, s, _ = x.shape
    return x.transpose(1, 2).reshape(b, s, -1).unflatten(-1, (n, -1)).transpose(1, 2)


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
        pairs_s = [student[k] for k in keys]
        pairs_t = [teacher[(position, self.layer_map[layer], name)] for position, layer, name in keys]
        if self.cfg.relation_heads:
            n = self.cfg.relation_heads
            pairs_s = [relation_heads(x, n) if k[0] == "A" else x for k, x in zip(keys, pairs_s)]
            pairs_t = [relation_heads(x, n) if k[0] == "A" else x for k, x in zip(keys, pairs_t)]
        losses = relation_losses(pairs_s, pairs_t, mask, form=self.cfg.form, tau=self.cfg.tau, impl=self.cfg.impl)
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
