"""On-the-fly BERT masked-language-model masking (vectorised, driven by an explicit generator).

Recipe (Devlin et al., 2019): each non-special, non-padding token is selected with probability
``mlm_probability`` (15%); a sequence with at least one candidate but no selection gets one
candidate selected at random (so every such sequence contributes to the loss). Of the selected
tokens 80% become [MASK], 10% a random token drawn uniformly from the non-special vocabulary,
10% stay unchanged. ``labels`` hold the original id at selected positions and -100 elsewhere.

Every random draw has a fixed shape and comes from the given ``torch.Generator``, so masks are a
pure function of (inputs, generator state); ``mlm_generator(seed, step, rank, micro_step)`` derives
such a generator for a resumable training loop.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100
BERT_MASK_ID = 103  # [MASK] in the BERT uncased/cased vocabularies


def mlm_generator(seed: int, step: int, rank: int, micro_step: int = 0, device: str | torch.device = "cpu"
                  ) -> torch.Generator:
    """A ``torch.Generator`` seeded from (seed, step, rank, micro_step) via numpy's SeedSequence."""
    entropy = np.random.SeedSequence([int(seed), int(step), int(rank), int(micro_step)]).generate_state(2, np.uint64)
    g = torch.Generator(device=device)
    g.manual_seed(int(entropy[0]) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def random_token_pool(vocab_size: int, special_ids: Sequence[int]) -> torch.Tensor:
    """Ids a masked token may be replaced with: ``range(vocab_size)`` minus the special ids."""
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[torch.as_tensor(list(special_ids), dtype=torch.long)] = False
    return torch.nonzero(keep).flatten()


def _special_and_mask_id(special_ids: Any, mask_token_id: int | None,
                         device: torch.device) -> tuple[torch.Tensor, int]:
    """The never-selected ids as a tensor, and the [MASK] id (a `SpecialIds`' own, else BERT's 103
    when it is among the special ids)."""
    if hasattr(special_ids, "mask") and hasattr(special_ids, "all"):  # a tokenizer.SpecialIds
        mask_token_id = special_ids.mask if mask_token_id is None else mask_token_id
        special_ids = special_ids.all
    special = torch.as_tensor(list(special_ids) if not torch.is_tensor(special_ids) else special_ids,
                              dtype=torch.long, device=device)
    if mask_token_id is None:
        if BERT_MASK_ID not in special.tolist():
            raise ValueError("mask_token_id not given and special_ids is not a SpecialIds holding it")
        mask_token_id = BERT_MASK_ID
    return special, mask_token_id


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    special_ids: Any,
    vocab_size: int,
    generator: torch.Generator,
    mlm_probability: float = 0.15,
    mask_token_id: int | None = None,
    random_pool: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply BERT MLM masking to a ``(batch, seq)`` LongTensor; returns ``(masked_input_ids, labels)``.

    ``special_ids`` (a ``tokenizer.SpecialIds``, or a sequence/tensor of ids: include
    pad/cls/sep/mask/unk) are never selected; nor are positions where ``attention_mask`` is 0.
    ``mask_token_id`` comes from a ``SpecialIds``; with a plain id list it defaults to BERT's 103
    (only if 103 is among the special ids) - pass it explicitly for other vocabularies.
    ``random_pool`` overrides the ids used for random replacement (default: non-special vocab).
    The input is not modified.
    """
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    if input_ids.dim() == 1:
        masked, labels = mask_tokens(input_ids[None], None if attention_mask is None else attention_mask[None],
                                     special_ids, vocab_size, generator, mlm_probability, mask_token_id, random_pool)
        return masked[0], labels[0]
    device = input_ids.device
    gdev = generator.device
    special, mask_token_id = _special_and_mask_id(special_ids, mask_token_id, device)
    if random_pool is None:
        random_pool = random_token_pool(vocab_size, special.tolist())
    random_pool = random_pool.to(device)

    candidates = ~torch.isin(input_ids, special)
    if attention_mask is not None:
        candidates &= attention_mask.to(torch.bool)

    shape = input_ids.shape
    u_select = torch.rand(shape, generator=generator, device=gdev).to(device)
    u_force = torch.rand(shape, generator=generator, device=gdev).to(device)
    u_action = torch.rand(shape, generator=generator, device=gdev).to(device)
    rand_pick = torch.randint(len(random_pool), shape, generator=generator, device=gdev).to(device)

    selected = candidates & (u_select < mlm_probability)
    # at least one selected token in every row that has a candidate
    need = candidates.any(dim=1) & ~selected.any(dim=1)
    if need.any():
        scores = torch.where(candidates, u_force, torch.full_like(u_force, -1.0))
        forced = scores.argmax(dim=1)
        rows = torch.nonzero(need).flatten()
        selected[rows, forced[rows]] = True

    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    to_mask = selected & (u_action < 0.8)
    to_random = selected & (u_action >= 0.8) & (u_action < 0.9)
    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = random_pool[rand_pick[to_random]]
    return masked, labels


def collate_examples(examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of ``PackedDataset`` items (equal-length tensors) into a batch dict."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    return {k: torch.stack([ex[k] for ex in examples]) for k in examples[0]}


class MLMCollator:
    """DataLoader ``collate_fn``: stacks examples and applies ``mask_tokens``.

    Adds ``labels`` and replaces ``input_ids`` with the masked ids. Uses ``self.generator`` (seeded
    from ``seed`` unless given); the trainer may swap it per step with ``set_generator`` (e.g.
    ``mlm_generator(seed, step, rank)``) for exactly reproducible masks on resume. With
    ``num_workers > 0`` every worker holds a copy of the same generator; to keep masks distinct and
    reproducible there, collate without masking (``collate_examples``) and call ``mask_batch`` in the
    training process.
    """

    def __init__(self, special_ids: Sequence[int], vocab_size: int, mask_token_id: int,
                 mlm_probability: float = 0.15, seed: int = 0, generator: torch.Generator | None = None):
        self.special_ids = tuple(int(i) for i in special_ids)
        self.vocab_size = int(vocab_size)
        self.mask_token_id = int(mask_token_id)
        self.mlm_probability = float(mlm_probability)
        self.random_pool = random_token_pool(self.vocab_size, self.special_ids)
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(seed)
        self.generator = generator

    @classmethod
    def from_special(cls, special: Any, **kwargs: Any) -> MLMCollator:
        """Build from a ``tokenizer.SpecialIds`` (e.g. ``PackedDataset.special``)."""
        return cls(special.all, special.vocab_size, special.mask, **kwargs)

    def set_generator(self, generator: torch.Generator) -> None:
        self.generator = generator

    def mask_batch(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
                   ) -> dict[str, torch.Tensor]:
        """A copy of ``batch`` with masked ``input_ids`` and ``labels``."""
        masked, labels = mask_tokens(batch["input_ids"], batch.get("attention_mask"), self.special_ids,
                                     self.vocab_size, generator or self.generator, self.mlm_probability,
                                     self.mask_token_id, self.random_pool)
        return {**batch, "input_ids": masked, "labels": labels}

    def __call__(self, examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return self.mask_batch(collate_examples(examples))
