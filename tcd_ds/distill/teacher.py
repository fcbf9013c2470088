"""The frozen vanilla teacher: loaded from a local model directory, kept outside any engine.

Accepted paths: a Hugging Face BERT directory (config.json + model.safetensors or
pytorch_model.bin), a tcd-ds export directory (the same layout), or a tcd-ds run directory (its
`export/`). Only the encoder is kept, and only up to the deepest tapped layer: the teacher never
runs an MLM head. Its dtype is its own (fp16 on GPU by default; on CPU bf16 where native, else fp32), since it never
enters the DeepSpeed engine and no ZeRO partitioning or engine cast touches it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tcd_ds.config import DistillConfig, ModelConfig
from tcd_ds.distill.taps import Key, Taps, tap_points
from tcd_ds.model.bert import BertModel
from tcd_ds.model.hf import CheckpointError, load_hf_state_dict, read_pretrained

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # CPU: bf16 where the CPU multiplies it natively (the teacher's forward took 0.043
        # against 0.083 s a step in fp32: small, 1 thread, AMX Xeon), else fp32
        from tcd_ds.hardware import cpu_bf16_native

        return torch.float16 if device.type == "cuda" else torch.bfloat16 if cpu_bf16_native() else torch.float32
    if name == "fp16" and device.type == "cpu":
        raise CheckpointError("teacher.dtype=fp16 is for GPUs; on CPU use bf16 or fp32")
    return DTYPES[name]


def teacher_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"teacher path {path} does not exist")
    if (path / "export" / "config.json").is_file():
        return path / "export"  # a tcd-ds run directory
    return path


def read_teacher_config(path: str | Path) -> ModelConfig:
    """The teacher's model config alone (cheap: no weights), for checks before any compute."""
    import json

    from tcd_ds.model.hf import config_from_hf

    cfg_file = teacher_dir(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"teacher path {path} is not a model directory: {cfg_file} is missing")
    try:
        return config_from_hf(json.loads(cfg_file.read_text()))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {err}") from None


def check_teacher_positions(teacher: ModelConfig, max_seq_len: int, path: str | Path) -> None:
    """Refuse, before any compute, a teacher whose position table is shorter than the training
    sequences: its forward would index past it (an IndexError on CPU, a device-side assert on GPU
    that takes the whole process group down)."""
    if teacher.max_position < max_seq_len:
        raise CheckpointError(f"the teacher at {path} has max_position={teacher.max_position}, below "
                              f"data.max_seq_len={max_seq_len}: it cannot read sequences that long; set "
                              f"data.max_seq_len<={teacher.max_position} or use a teacher with "
                              f"max_position>={max_seq_len}")


class FrozenTeacher(nn.Module):
    """An encoder-only BERT with taps; `forward` returns the captured positions, no grads."""

    def __init__(self, encoder: BertModel, positions: str, include_embeddings: bool, num_layers: int):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.num_layers = num_layers
        self.taps = Taps(tap_points(encoder, positions, include_embeddings, num_layers))

    @property
    def config(self) -> ModelConfig:
        return self.encoder.config

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)  # always eval: no dropout in the teacher

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> dict[Key, torch.Tensor]:
        with self.taps as captured:
            self.encoder(input_ids, attention_mask, token_type_ids, num_layers=self.num_layers)
        return captured


def load_teacher(path: str | Path, distill: DistillConfig, dtype: str = "auto",
                 device: str | torch.device = "cpu") -> FrozenTeacher:
    """Load a dense BERT from `path` as a frozen, tapped teacher on `device`."""
    device = torch.device(device)
    cfg, sd = read_pretrained(teacher_dir(path))
    if cfg.moe.num_experts:
        raise CheckpointError(f"the teacher at {path} is an MoE model; TCD's teacher is a vanilla (dense) BERT")
    cfg.hidden_dropout = cfg.attention_dropout = 0.0
    encoder = BertModel(cfg)
    load_hf_state_dict(encoder, sd)
    encoder.to(device=device, dtype=resolve_dtype(dtype, device))
    return FrozenTeacher(encoder, distill.positions, distill.include_embeddings, cfg.num_layers)
