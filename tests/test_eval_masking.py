"""Held-out evaluation masks at `data.eval_mlm_probability` (15 %), whatever the training masking, so
runs trained at different masking rates report comparable accuracies."""
from types import SimpleNamespace

import torch

from tcd_ds.config import build_config
from tcd_ds.dist import Layout
from tcd_ds.train import evaluate


class Rows:
    def __len__(self):
        return 10_000

    def get_batch(self, indices):
        g = torch.Generator().manual_seed(len(indices))
        ids = torch.randint(10, 500, (len(indices), 128), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


class CountingEngine:
    """Stands in for the DeepSpeed engine: records the masked fraction of each batch it is given."""

    def __init__(self):
        self.module, self.fractions = torch.nn.Linear(1, 1), []

    def __call__(self, ids, mask, types, labels):
        n = (labels != -100).sum()
        self.fractions.append(float(n) / labels.numel())
        return SimpleNamespace(num_masked=n, mlm_loss=torch.tensor(1.0), correct=n // 2)


def test_eval_masking_is_fixed_whatever_the_training_masking():
    data = SimpleNamespace(special=SimpleNamespace(all=[0, 1, 2, 3, 4], mask=4), vocab_size=500)
    layout = Layout(0, 1, 0, "127.0.0.1", 0, "single")
    seen = {}
    for train_rate in (0.15, 0.4):
        cfg = build_config("tiny", ["mode=vanilla", f"data.mlm_probability={train_rate}", "train.eval_batches=8",
                                    "train.micro_batch_size=16"])
        engine = CountingEngine()
        evaluate(engine, data, Rows(), cfg, layout, torch.device("cpu"))
        seen[train_rate] = sum(engine.fractions) / len(engine.fractions)
    assert abs(seen[0.4] - 0.15) < 0.02 and seen[0.4] == seen[0.15]
    cfg = build_config("tiny", ["mode=vanilla", "data.eval_mlm_probability=0.3", "train.eval_batches=8"])
    engine = CountingEngine()
    evaluate(engine, data, Rows(), cfg, layout, torch.device("cpu"))
    assert abs(sum(engine.fractions) / len(engine.fractions) - 0.3) < 0.02


class Indexed:
    """Sequence j holds tokens derived from j alone, so a batch's rows can be told apart."""

    def __len__(self):
        return 64

    def get_batch(self, indices):
        ids = torch.stack([torch.randint(10, 500, (32,), generator=torch.Generator().manual_seed(j)) for j in indices])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


class RecordingEngine(CountingEngine):
    def __init__(self):
        super().__init__()
        self.rows = []

    def __call__(self, ids, mask, types, labels):
        self.rows += [(tuple(i.tolist()), tuple(lab.tolist())) for i, lab in zip(ids, labels)]
        return super().__call__(ids, mask, types, labels)


def _eval_masks(overrides, world=1):
    """{masked ids: labels} of every held-out sequence that the ranks of a `world`-rank layout evaluate."""
    data = SimpleNamespace(special=SimpleNamespace(all=[0, 1, 2, 3, 4], mask=4), vocab_size=500)
    cfg = build_config("tiny", ["mode=vanilla", "train.eval_batches=4", *overrides])
    rows = {}
    for rank in range(world):
        engine = RecordingEngine()
        evaluate(engine, data, Indexed(), cfg, Layout(rank, world, rank, "127.0.0.1", 0, "single"), torch.device("cpu"))
        rows.update(engine.rows)
    return rows


def test_runs_with_other_seeds_and_layouts_evaluate_the_same_masked_tokens():
    one = _eval_masks(["seed=1", "train.micro_batch_size=16"])
    assert len(one) == 64  # every sequence, once
    assert one == _eval_masks(["seed=2", "train.micro_batch_size=16"])  # the training seed plays no part
    assert one == _eval_masks(["seed=3", "train.micro_batch_size=8"], world=2)  # nor the layout
    other = _eval_masks(["seed=1", "train.micro_batch_size=16", "data.eval_seed=7"])
    assert set(one.values()) != set(other.values())
