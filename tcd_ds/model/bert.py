"""A compact BERT encoder (post-LN as BERT, or pre-LN) whose FFNs can be mixtures of experts.

Module names follow Hugging Face's `BertForMaskedLM` (`bert.encoder.layer.3.attention.self.query`,
...), so a dense model's state dict *is* a Hugging Face state dict, and every TCD tap position is the
output of exactly one module:

- T (trunk): `bert.embeddings` (layer 0) and each `bert.encoder.layer.i`;
- I (residual inner): `attention.output.dense` and the FFN's last module (`output.dense`, or `moe`
  in an MoE layer), both *before* dropout and the residual add;
- A (attention): `attention.self.query/key/value`, taken before `scaled_dot_product_attention`, so
  tapping never forces an unfused attention kernel (with rotary positions: before the rotation).

With `layer_norm="pre"` the same modules compute a pre-LN layer: `attention.output.LayerNorm`
normalises the attention's input and `output.LayerNorm` the FFN's, the residual stream is not
normalised, and `bert.encoder.final_norm` normalises the last layer's output. Such a model is not a
Hugging Face `BertModel` (which is post-LN), though its state dict has the same names plus that one.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tcd_ds.config import ModelConfig
from tcd_ds.model.moe import build_moe
from tcd_ds.model.routing import MoEStats


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        if cfg.position_encoding == "absolute":  # rotary positions live in the attention instead
            self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if hasattr(self, "position_embeddings"):
            x = x + self.position_embeddings(torch.arange(input_ids.shape[1], device=input_ids.device))
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


@functools.lru_cache(maxsize=16)
def rotary_cos_sin(seq_len: int, dim: int, device: torch.device, dtype: torch.dtype, base: float = 10000.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles p * base^(-2i/d), [S, d/2], computed in float64 once per shape
    (every layer's Q and K reuse them: the training step would otherwise redo them 2 x layers times)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    angle = torch.arange(seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rotate_positions(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoFormer's rotary position embedding of [B, heads, S, d]: feature pair (2i, 2i+1) of position
    p turned by the angle p * base^(-2i/d), so q.k depends on the positions only through p_q - p_k."""
    cos, sin = rotary_cos_sin(x.shape[-2], x.shape[-1], x.device, x.dtype, base)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class SelfAttention(nn.Module):
    """Q, K, V projections (each one tappable module) and fused SDPA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_dropout
        self.rotary = cfg.position_encoding == "rotary"

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, heads*dim] -> [B, heads, S, dim] (a view)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (self.split_heads(proj(x)) for proj in (self.query, self.key, self.value))
        if self.rotary:  # the A taps (query/key outputs) see the vectors before the rotation
            q, k = rotate_positions(q), rotate_positions(k)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return ctx.transpose(1, 2).flatten(2)


class ResidualOutput(nn.Module):
    """Optional projection (`dense`, the I tap), dropout, residual add, then (post-LN) LayerNorm.
    In a pre-LN layer `LayerNorm` is the sublayer's input norm instead (`normed_input`)."""

    def __init__(self, cfg: ModelConfig, in_features: int | None):
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size) if in_features else None
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.pre_norm = cfg.layer_norm == "pre"

    def normed_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the sublayer reads: x itself (post-LN) or LayerNorm(x) (pre-LN)."""
        return self.LayerNorm(x) if self.pre_norm else x

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            x = self.dense(x)
        if self.pre_norm:
            return residual + self.dropout(x)
        return self.LayerNorm(self.dropout(x) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = ResidualOutput(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(self.output.normed_input(x), attn_mask), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    """One post-LN transformer layer; the FFN is dense (`intermediate` + `output.dense`) or `moe`."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attention = Attention(cfg)
        if moe:
            self.moe = build_moe(cfg)
            self.output = ResidualOutput(cfg, None)
        else:
            self.intermediate = Intermediate(cfg)
            self.output = ResidualOutput(cfg, cfg.intermediate_size)

    @property
    def is_moe(self) -> bool:
        return hasattr(self, "moe")

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, MoEStats | None]:
        h = self.attention(x, attn_mask)
        f = self.output.normed_input(h)
        if self.is_moe:
            y, stats = self.moe(f)
            return self.output(y, h), stats
        return self.output(self.intermediate(f), h), None


class EncoderOutput(NamedTuple):
    hidden: torch.Tensor  # [B, S, H]
    aux_loss: torch.Tensor  # sum over MoE layers of their weighted router losses (0 for dense)
    moe_stats: list[MoEStats]  # one per MoE layer, in layer order


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_layers))
        self.checkpointing = cfg.activation_checkpointing
        if cfg.layer_norm == "pre":
            self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class BertModel(nn.Module):
    """Embeddings + encoder (+ optional pooler for classification)."""

    def __init__(self, cfg: ModelConfig, add_pooler: bool = False):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        if add_pooler:
            self.pooler = nn.Module()
            self.pooler.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, num_layers: int | None = None) -> EncoderOutput:
        """Run the embeddings and the first `num_layers` layers (all by default)."""
        x = self.embeddings(input_ids, token_type_ids)
        attn_mask = None
        if attention_mask is not None:
            attn_mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]: keys a query may see
        aux = x.new_zeros((), dtype=torch.float32)
        stats: list[MoEStats] = []
        for layer in self.encoder.layer[:num_layers]:
            if self.encoder.checkpointing and self.training and torch.is_grad_enabled():
                x, s = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x, s = layer(x, attn_mask)
            if s is not None:
                aux = aux + s.loss
                stats.append(s)
        if hasattr(self.encoder, "final_norm") and (num_layers is None or num_layers >= len(self.encoder.layer)):
            x = self.encoder.final_norm(x)
        return EncoderOutput(x, aux, stats)

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler.dense(hidden[:, 0]))


class MLMHead(nn.Module):
    """`cls.predictions`: transform (dense, gelu, LayerNorm) then the decoder tied to the embeddings."""

    def __init__(self, cfg: ModelConfig, embeddings: nn.Embedding):
        super().__init__()
        self.predictions = nn.Module()
        self.predictions.transform = nn.Module()
        self.predictions.transform.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.predictions.transform.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.predictions.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.embeddings = [embeddings]  # a list, so the tied weight is not registered twice

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t = self.predictions.transform
        h = t.LayerNorm(F.gelu(t.dense(h)))
        return F.linear(h, self.embeddings[0].weight, self.predictions.bias)


class MLMOutput(NamedTuple):
    loss: torch.Tensor | None  # MLM + aux (the student's own objective); None without labels
    mlm_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    logits: torch.Tensor  # [B, S, V], or [N_masked, V] when only masked positions are predicted
    correct: torch.Tensor | None  # number of masked tokens predicted right
    num_masked: torch.Tensor | None
    moe_stats: list[MoEStats]


class BertForMaskedLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        self.cls = MLMHead(cfg, self.bert.embeddings.word_embeddings)
        init_weights(self, cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                masked_only: bool = True) -> MLMOutput:
        """With `labels` and `masked_only`, the head runs on the masked positions alone (gather first)."""
        enc = self.bert(input_ids, attention_mask, token_type_ids)
        if labels is None:
            return MLMOutput(None, None, enc.aux_loss, self.cls(enc.hidden), None, None, enc.moe_stats)
        if masked_only:
            where = labels != -100
            logits, target = self.cls(enc.hidden[where]), labels[where]
        else:
            logits, target = self.cls(enc.hidden), labels
        flat_logits, flat_target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
        mlm = F.cross_entropy(flat_logits.float(), flat_target, ignore_index=-100)
        valid = flat_target != -100
        correct = (flat_logits.argmax(-1) == flat_target)[valid].sum()
        return MLMOutput(mlm + enc.aux_loss, mlm, enc.aux_loss, logits, correct, valid.sum(), enc.moe_stats)


class BertForSequenceClassification(nn.Module):
    """Pooler + classifier; `num_labels == 1` is regression (STS-B)."""

    def __init__(self, cfg: ModelConfig, num_labels: int, classifier_dropout: float | None = None):
        super().__init__()
        self.config, self.num_labels = cfg, num_labels
        self.bert = BertModel(cfg, add_pooler=True)
        self.dropout = nn.Dropout(cfg.hidden_dropout if classifier_dropout is None else classifier_dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        init_weights(self, cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Returns (loss incl. aux or None, logits, aux loss)."""
        enc = self.bert(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.dropout(self.bert.pooled(enc.hidden)))
        if labels is None:
            return None, logits, enc.aux_loss
        if self.num_labels == 1:
            loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
        else:
            loss = F.cross_entropy(logits.float(), labels)
        return loss + enc.aux_loss, logits, enc.aux_loss


def sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """Vaswani et al.'s table, [positions, dim] in float64: sin on even features, cos on odd ones."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-torch.log(torch.tensor(10000.0,
                                                                                          dtype=torch.float64)) / dim))
    table = torch.zeros(positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """BERT's init: normal(0, initializer_range) for matrices, zeros for biases, ones for LayerNorm;
    with `position_init="sinusoidal"` the position embeddings start as a sinusoid table scaled to the
    same std (sin and cos have std 1/sqrt(2)), drawn after everything else (same RNG stream).

    An MoE FFN initialises itself (`reset_expert_parameters`: the router from the global RNG, each
    expert from its global index) and its submodules are not visited again: the DeepSpeed backend's
    experts are `nn.Linear`s, and re-drawing them here from the global RNG would make experts copies
    of each other across expert-parallel ranks and the later layers depend on ep_size."""

    def visit(module: nn.Module) -> None:
        if hasattr(module, "reset_expert_parameters"):
            module.reset_expert_parameters(cfg.initializer_range)
            return
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=cfg.initializer_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        for child in module.children():
            visit(child)

    visit(model)
    if cfg.position_init == "sinusoidal":
        for module in model.modules():
            if isinstance(module, Embeddings):
                weight = module.position_embeddings.weight
                with torch.no_grad():
                    weight.copy_(sinusoid_table(*weight.shape) * (cfg.initializer_range * 2 ** 0.5))


def num_parameters(model: nn.Module, active: bool = False) -> int:
    """Parameters in the global model, whatever `ep_size` (an expert-parallel rank's experts are 1 /
    `expert_shards` of its layer's); `active=True` counts each MoE layer's experts as top_k experts."""
    def count(p: torch.Tensor) -> float:
        return p.numel() * (getattr(p, "active_fraction", 1.0) if active else getattr(p, "expert_shards", 1))

    return sum(round(count(p)) for p in model.parameters())


def flops_per_token(cfg: ModelConfig, seq_len: int, masked_fraction: float | None = 0.15) -> float:
    """Training FLOPs per token (forward+backward = 3x forward), counting each MoE layer's top_k
    experts; the MLM head runs on `masked_fraction` of the tokens (None: all of them)."""
    h, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    k = cfg.moe.top_k if cfg.moe.num_experts else 1
    attn = 4 * h * h + 2 * seq_len * h  # projections + scores/context per token (multiply-adds)
    ffn_dense, ffn_moe = 2 * h * f, 2 * h * f * k + h * cfg.moe.num_experts
    ffn = sum(ffn_moe if cfg.is_moe_layer(i) else ffn_dense for i in range(n))
    head = (h * h + h * cfg.vocab_size) * (1.0 if masked_fraction is None else masked_fraction)
    return 2 * 3 * (n * attn + ffn + head)

