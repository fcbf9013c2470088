"""Shared test fixtures: where the real public data lives, and small helpers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TCD_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the repo; tests that need it skip, with the reason, when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set TCD_SHARED_DATA or put shared/ beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def vocab_file(shared_data: Path) -> Path:
    return shared_data / "vocab" / "bert-base-uncased-vocab.txt"


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    """A vanilla BERT of the tiny recipe's shape with random weights, saved as a model directory
    (for tests of the plumbing around the teacher, not of what it knows)."""
    import torch

    from tcd_ds.config import ModelConfig
    from tcd_ds.model.bert import BertForMaskedLM
    from tcd_ds.model.hf import save_pretrained

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256, max_position=128)
    out = tmp_path_factory.mktemp("teacher")
    save_pretrained(BertForMaskedLM(cfg), cfg, out)
    return out


from slurm_cluster import slurm_cluster  # noqa: E402,F401  (the module-scoped 2-node Slurm fixture)


def pytest_collection_modifyitems(config, items):
    """Markers (pyproject.toml) that follow from a test's fixtures, so no test can miss them: a test
    on the Slurm test cluster needs Slurm, runs its jobs in processes and is slow."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            for name in ("slurm", "multiproc", "slow"):
                if item.get_closest_marker(name) is None:
                    item.add_marker(name)
