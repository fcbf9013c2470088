"""MoE-BERT (tcd-ds) as a Hugging Face `transformers` custom-code model.

This file is copied, as `modeling_tcd_moe_bert.py`, into every tcd-ds export that Hugging Face's own
`BertForMaskedLM` cannot run (an MoE student, or a pre-LN encoder); the export's config.json names it
in `auto_map`. So, with nothing but torch and transformers installed:

    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification
    mlm = AutoModelForMaskedLM.from_pretrained(export_dir, trust_remote_code=True)
    clf = AutoModelForSequenceClassification.from_pretrained(export_dir, trust_remote_code=True, num_labels=2)

It is self-contained on purpose: it imports torch and transformers only (never tcd_ds), needs no
network, and computes what tcd-ds' own model computes (tcd_ds/model/bert.py, moe.py, routing.py,
experts/loop.py), with the same parameter names, so the export's model.safetensors loads as is:

- BERT embeddings, attention (fused scaled-dot-product attention), post-LN layers as Hugging Face
  BERT, or pre-LN layers (`tcd_layer_norm="pre"`: the sublayer's input is normalised, the residual
  stream is not, and `bert.encoder.final_norm` normalises the last layer's output);
- an MoE FFN (`moe.router.weight [E, H]`, `moe.experts.w1 [E, H, F]`, `b1 [E, F]`, `w2 [E, F, H]`,
  `b2 [E, H]`) in every layer i with `(i + 1) % moe_every == 0`: an fp32 router, softmax over all
  experts, top-k, gates renormalised over the k choices (`normalize_top_k`), expert e computing
  `gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e]`; with a capacity factor (`capacity_factor` in training,
  `eval_capacity_factor` in eval mode; 0 = dropless) assignments beyond
  `max(min_capacity, ceil(cf * tokens * k / E))` per expert are dropped in priority order (all first
  choices in token order, then all second choices, ...); router jitter in training only;
- the router losses (Switch load balancing `E * sum_e f_e * P_e` with f_e the fraction of first
  choices, and the ST-MoE z-loss), weighted by `aux_loss_weight` / `z_loss_weight`, summed over the
  MoE layers: every output carries them as `aux_loss`, and a loss computed from `labels` includes
  them (the objective tcd-ds trains and fine-tunes with).

The MoE settings ride in config.json's `tcd_moe` section, the layer-norm placement in
`tcd_layer_norm`, exactly as tcd-ds writes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, MaskedLMOutput, SequenceClassifierOutput

_MOE_DEFAULTS = {
    "num_experts": 0, "top_k": 1, "moe_every": 1, "capacity_factor": 0.0, "eval_capacity_factor": 0.0,
    "min_capacity": 4, "aux_loss_weight": 0.01, "z_loss_weight": 0.0, "jitter": 0.0, "normalize_top_k": True,
}


class TcdMoeBertConfig(PretrainedConfig):
    """BERT's configuration plus `tcd_moe` (the MoE FFN, a dict as tcd-ds writes it; no experts when
    empty) and `tcd_layer_norm` ("post": BERT's layer, "pre": pre-LN)."""

    model_type = "tcd_moe_bert"

    def __init__(self, vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                 attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                 initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, position_embedding_type="absolute",
                 classifier_dropout=None, tcd_moe=None, tcd_layer_norm="post", tie_word_embeddings=True, **kwargs):
        if hidden_act not in ("gelu", "gelu_python"):
            raise ValueError(f"hidden_act={hidden_act!r} is not supported (tcd-ds BERT uses exact gelu)")
        if position_embedding_type not in ("absolute", "rotary"):
            raise ValueError(f"position_embedding_type must be 'absolute' or 'rotary', got {position_embedding_type!r}")
        if tcd_layer_norm not in ("post", "pre"):
            raise ValueError(f"tcd_layer_norm must be 'post' or 'pre', got {tcd_layer_norm!r}")
        moe = dict(tcd_moe or {})
        unknown = sorted(set(moe) - set(_MOE_DEFAULTS) - {"backend", "ep_size"})
        if unknown:
            raise ValueError(f"tcd_moe has unknown settings {unknown}")
        num_experts = moe.get("num_experts", 0)
        if num_experts and not 1 <= moe.get("top_k", 1) <= num_experts:
            raise ValueError(f"tcd_moe.top_k must be in [1, num_experts={num_experts}], got {moe.get('top_k')}")
        if num_experts and moe.get("moe_every", 1) < 1:
            raise ValueError(f"tcd_moe.moe_every must be >= 1, got {moe.get('moe_every')}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.position_embedding_type = position_embedding_type
        self.classifier_dropout = classifier_dropout
        self.tcd_moe = moe
        self.tcd_layer_norm = tcd_layer_norm
        super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)

    def moe_setting(self, name: str):
        return self.tcd_moe.get(name, _MOE_DEFAULTS[name])

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer `index` (0-based) has an MoE FFN: with moe_every=k, layers k-1, 2k-1, ..."""
        return self.moe_setting("num_experts") > 0 and (index + 1) % self.moe_setting("moe_every") == 0


# --- outputs: Hugging Face's, plus the router losses ------------------------------------------------

@dataclass
class TcdMoeBertModelOutput(BaseModelOutputWithPooling):
    """`aux_loss`: the weighted router losses summed over the MoE layers (0 without experts)."""

    aux_loss: Optional[torch.FloatTensor] = None


@dataclass
class TcdMoeMaskedLMOutput(MaskedLMOutput):
    """`loss` (with `labels`) is the MLM cross-entropy plus `aux_loss`."""

    aux_loss: Optional[torch.FloatTensor] = None


@dataclass
class TcdMoeSequenceClassifierOutput(SequenceClassifierOutput):
    """`loss` (with `labels`) is the task loss plus `aux_loss`."""

    aux_loss: Optional[torch.FloatTensor] = None


# --- modules (names as tcd-ds' and Hugging Face BERT's) --------------------------------------------

def rotate_positions(x, base=10000.0):
    """RoFormer's rotary position embedding of [B, heads, S, d]: feature pair (2i, 2i+1) of position
    p turned by the angle p * base^(-2i/d)."""
    d, s = x.shape[-1], x.shape[-2]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    angle = torch.arange(s, dtype=torch.float64, device=x.device)[:, None] * inv_freq
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class TcdMoeBertEmbeddings(nn.Module):
    def __init__(self, config: TcdMoeBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        if config.position_embedding_type == "absolute":  # rotary positions live in the attention
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if hasattr(self, "position_embeddings"):
            if position_ids is None:
                position_ids = torch.arange(x.shape[1], device=x.device)
            x = x + self.position_embeddings(position_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class TcdMoeBertSelfAttention(nn.Module):
    def __init__(self, config: TcdMoeBertConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size={config.hidden_size} is not divisible by "
                             f"num_attention_heads={config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.rotary = config.position_embedding_type == "rotary"

    def forward(self, x, attn_mask):
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        if self.rotary:
            q, k = rotate_positions(q), rotate_positions(k)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return ctx.transpose(1, 2).flatten(2)


class TcdMoeBertResidualOutput(nn.Module):
    """Optional projection, dropout, residual add, then (post-LN) LayerNorm; in a pre-LN layer
    `LayerNorm` normalises the sublayer's input instead."""

    def __init__(self, config: TcdMoeBertConfig, in_features):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size) if in_features else None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.pre_norm = config.tcd_layer_norm == "pre"

    def normed_input(self, x):
        return self.LayerNorm(x) if self.pre_norm else x

    def forward(self, x, residual):
        if self.dense is not None:
            x = self.dense(x)
        if self.pre_norm:
            return residual + self.dropout(x)
        return self.LayerNorm(self.dropout(x) + residual)


class TcdMoeBertAttention(nn.Module):
    def __init__(self, config: TcdMoeBertConfig):
        super().__init__()
        self.self = TcdMoeBertSelfAttention(config)
        self.output = TcdMoeBertResidualOutput(config, config.hidden_size)

    def forward(self, x, attn_mask):
        return self.output(self.self(self.output.normed_input(x), attn_mask), x)


class TcdMoeBertIntermediate(nn.Module):
    def __init__(self, config: TcdMoeBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class TcdMoeBertRouter(nn.Module):
    """Linear gate in fp32 (optional multiplicative jitter in training), softmax, top-k."""

    def __init__(self, config: TcdMoeBertConfig):
        super().__init__()
        self.top_k = config.moe_setting("top_k")
        self.normalize_top_k = config.moe_setting("normalize_top_k")
        self.jitter = config.moe_setting("jitter")
        self.weight = nn.Parameter(torch.empty(config.moe_setting("num_experts"), config.hidden_size))
        nn.init.normal_(self.weight, std=config.initializer_range)

    def forward(self, x):
        x = x.float()
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = F.linear(x, self.weight.float())
        probs = logits.softmax(dim=-1)
        gate, expert = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1 and self.normalize_top_k:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        return expert, gate, probs, logits


class TcdMoeBertExperts(nn.Module):
    """Stacked expert weights: expert e computes gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e]."""

    def __init__(self, config: TcdMoeBertConfig):
        super().__init__()
        e, h, f = config.moe_setting("num_experts"), config.hidden_size, config.intermediate_size
        self.w1 = nn.Parameter(torch.empty(e, h, f))
        self.b1 = nn.Parameter(torch.zeros(e, f))
        self.w2 = nn.Parameter(torch.empty(e, f, h))
        self.b2 = nn.Parameter(torch.zeros(e, h))
        nn.init.normal_(self.w1, std=config.initializer_range)
        nn.init.normal_(self.w2, std=config.initializer_range)

    def forward(self, x, counts):
        """x [N, H] sorted by expert, `counts` [E] rows per expert; returns [N, H]."""
        out = x.new_empty(x.shape[0], self.w2.shape[-1])
        start = 0
        for e, rows in enumerate(counts.tolist()):
            if rows:
                sl = slice(start, start + rows)
                out[sl] = torch.addmm(self.b2[e], F.gelu(torch.addmm(self.b1[e], x[sl], self.w1[e])), self.w2[e])
            start += rows
        return out


class TcdMoeBertMoE(nn.Module):
    """Router, dispatch sorted by expert (capacity in priority order), experts, gate-weighted combine."""

    def __init__(self, config: TcdMoeBertConfig):
        super().__init__()
        self.num_experts = config.moe_setting("num_experts")
        self.top_k = config.moe_setting("top_k")
        self.capacity_factor = config.moe_setting("capacity_factor")
        self.eval_capacity_factor = config.moe_setting("eval_capacity_factor")
        self.min_capacity = config.moe_setting("min_capacity")
        self.aux_loss_weight = config.moe_setting("aux_loss_weight")
        self.z_loss_weight = config.moe_setting("z_loss_weight")
        self.router = TcdMoeBertRouter(config)
        self.experts = TcdMoeBertExperts(config)

    def capacity(self, num_tokens: int):
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor <= 0:
            return None
        return max(self.min_capacity, math.ceil(factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x):
        """x [B, S, H] -> (y [B, S, H], weighted router loss)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        choice, gates, probs, logits = self.router(x)
        num_tokens, k = choice.shape
        expert = choice.t().reshape(-1)  # slot-major: all first choices, then all second, ...
        gate = gates.t().reshape(-1)
        token = torch.arange(num_tokens, device=x.device).repeat(k)
        expert, order = torch.sort(expert, stable=True)
        token, gate = token[order], gate[order]
        counts = torch.bincount(expert, minlength=self.num_experts)
        cap = self.capacity(num_tokens)
        if cap is not None:
            starts = torch.cumsum(counts, 0) - counts
            keep = torch.arange(expert.numel(), device=x.device) - starts[expert] < cap
            token, expert, gate, counts = token[keep], expert[keep], gate[keep], counts.clamp(max=cap)
        out = self.experts(x.index_select(0, token), counts)
        y = torch.zeros_like(x).index_add_(0, token, out * gate.to(out.dtype)[:, None])
        first = torch.bincount(choice[:, 0], minlength=self.num_experts).to(probs.dtype) / num_tokens
        loss = self.aux_loss_weight * (self.num_experts * torch.sum(first * probs.mean(0)))
        if self.z_loss_weight > 0:
            loss = loss + self.z_loss_weight * torch.logsumexp(logits, dim=-1).square().mean()
        return y.reshape(shape), loss


class TcdMoeBertLayer(nn.Module):
    """Attention, then a dense FFN (`intermediate` + `output.dense`) or an MoE FFN (`moe`)."""

    def __init__(self, config: TcdMoeBertConfig, moe: bool):
        super().__init__()
        self.attention = TcdMoeBertAttention(config)
        if moe:
            self.moe = TcdMoeBertMoE(config)
            self.output = TcdMoeBertResidualOutput(config, None)
        else:
            self.intermediate = TcdMoeBertIntermediate(config)
            self.output = TcdMoeBertResidualOutput(config, config.intermediate_size)

    def forward(self, x, attn_mask):
        h = self.attention(x, attn_mask)
        f = self.output.normed_input(h)
        if hasattr(self, "moe"):
            y, loss = self.moe(f)
            return self.output(y, h), loss
        return self.output(self.intermediate(f), h), None


class TcdMoeBertEncoder(nn.Module):
    def __init__(self, config: TcdMoeBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(TcdMoeBertLayer(config, config.is_moe_layer(i))
                                   for i in range(config.num_hidden_layers))
        if config.tcd_layer_norm == "pre":
            self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class TcdMoeBertPooler(nn.Module):
    def __init__(self, config: TcdMoeBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


class TcdMoeBertPredictionHeadTransform(nn.Module):
    def __init__(self, config: TcdMoeBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h):
        return self.LayerNorm(F.gelu(self.dense(h)))


class TcdMoeBertLMPredictionHead(nn.Module):
    """`cls.predictions`: transform, then the decoder tied to the word embeddings (and to `bias`)."""

    def __init__(self, config: TcdMoeBertConfig):
        super().__init__()
        self.transform = TcdMoeBertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, h):
        return self.decoder(self.transform(h))


class TcdMoeBertOnlyMLMHead(nn.Module):
    def __init__(self, config: TcdMoeBertConfig):
        super().__init__()
        self.predictions = TcdMoeBertLMPredictionHead(config)

    def forward(self, h):
        return self.predictions(h)


# --- models -------------------------------------------------------------------------------------

class TcdMoeBertPreTrainedModel(PreTrainedModel):
    config_class = TcdMoeBertConfig
    base_model_prefix = "bert"
    _no_split_modules = ["TcdMoeBertLayer"]

    def _init_weights(self, module):
        """BERT's init (normal(0, initializer_range) matrices, zero biases, unit LayerNorms), the
        router and the experts alike; used for weights the checkpoint does not hold (a new head)."""
        std = self.config.initializer_range
        if isinstance(module, TcdMoeBertRouter):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, TcdMoeBertExperts):
            nn.init.normal_(module.w1, std=std)
            nn.init.normal_(module.w2, std=std)
            nn.init.zeros_(module.b1)
            nn.init.zeros_(module.b2)
        elif isinstance(module, TcdMoeBertLMPredictionHead):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _return(self, output, return_dict):
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return output if return_dict else output.to_tuple()


class TcdMoeBertModel(TcdMoeBertPreTrainedModel):
    """Embeddings + encoder (+ pooler); `aux_loss` sums the MoE layers' weighted router losses."""

    _keys_to_ignore_on_load_unexpected = [r"^cls\."]  # an export's MLM head, unused here

    def __init__(self, config: TcdMoeBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = TcdMoeBertEmbeddings(config)
        self.encoder = TcdMoeBertEncoder(config)
        self.pooler = TcdMoeBertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if output_attentions:
            raise ValueError("this model does not return attention weights (it runs fused attention)")
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        attn_mask = None
        if attention_mask is not None:
            attn_mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]: keys a query may see
        aux = x.new_zeros((), dtype=torch.float32)
        hidden_states = (x,) if output_hidden_states else None
        for layer in self.encoder.layer:
            x, loss = layer(x, attn_mask)
            if loss is not None:
                aux = aux + loss
            if output_hidden_states:
                hidden_states += (x,)
        if hasattr(self.encoder, "final_norm"):
            x = self.encoder.final_norm(x)
            if output_hidden_states:
                hidden_states = hidden_states[:-1] + (x,)
        pooled = self.pooler(x) if self.pooler is not None else None
        return self._return(TcdMoeBertModelOutput(last_hidden_state=x, pooler_output=pooled,
                                                  hidden_states=hidden_states, aux_loss=aux), return_dict)


class TcdMoeBertForMaskedLM(TcdMoeBertPreTrainedModel):
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: TcdMoeBertConfig):
        super().__init__(config)
        self.bert = TcdMoeBertModel(config, add_pooling_layer=False)
        self.cls = TcdMoeBertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                        output_attentions, output_hidden_states, return_dict=True)
        logits = self.cls(out.last_hidden_state)
        loss = None
        if labels is not None:
            mlm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
            loss = mlm + out.aux_loss
        return self._return(TcdMoeMaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                                 aux_loss=out.aux_loss), return_dict)


class TcdMoeBertForSequenceClassification(TcdMoeBertPreTrainedModel):
    """Pooler + dropout + classifier (the pooler and classifier are new when loading a pre-trained
    export); `num_labels == 1` is regression."""

    _keys_to_ignore_on_load_unexpected = [r"^cls\."]  # an export's MLM head, unused here

    def __init__(self, config: TcdMoeBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = TcdMoeBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                        output_attentions, output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = None
        if labels is not None:
            problem = self.config.problem_type
            if problem is None:
                if self.num_labels == 1:
                    problem = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem = "single_label_classification"
                else:
                    problem = "multi_label_classification"
            if problem == "regression":
                loss = F.mse_loss(logits.squeeze(-1).float() if self.num_labels == 1 else logits.float(),
                                  labels.float())
            elif problem == "single_label_classification":
                loss = F.cross_entropy(logits.reshape(-1, self.num_labels).float(), labels.reshape(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
            loss = loss + out.aux_loss
        return self._return(TcdMoeSequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                                           aux_loss=out.aux_loss), return_dict)


__all__ = ["TcdMoeBertConfig", "TcdMoeBertModel", "TcdMoeBertForMaskedLM", "TcdMoeBertForSequenceClassification",
           "TcdMoeBertPreTrainedModel"]
