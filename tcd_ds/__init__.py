"""tcd-ds: Transfer Capability Distillation for MoE-BERT on DeepSpeed."""

__version__ = "0.1.0"
