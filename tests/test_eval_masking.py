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
