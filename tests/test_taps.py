"""Every TCD tap position recomputed independently, in float64, from the weights alone (no module of
ours runs in the reference): T = the embedding output and each layer's output; I = the attention
output projection and the FFN / MoE output, both before dropout, the residual add and LayerNorm;
A = the Q, K, V projections split per head. For dense and MoE layers, student and teacher."""
from __future__ import annotations

import math

import pytest
import torch

from tcd_ds.config import ModelConfig, MoEConfig
from tcd_ds.distill.taps import Taps, tap_points
from tcd_ds.distill.teacher import FrozenTeacher
from tcd_ds.model.bert import BertForMaskedLM

B, S, V, H, HEADS, F_ = 2, 7, 40, 16, 4, 24


def _config(moe: bool, **kw) -> ModelConfig:
    cfg = ModelConfig(vocab_size=V, hidden_size=H, num_layers=3, num_heads=HEADS, intermediate_size=F_,
                      max_position=16, hidden_dropout=0.0, attention_dropout=0.0,
                      moe=MoEConfig(num_experts=4, top_k=2, moe_every=2) if moe else MoEConfig(), **kw)
    cfg.validate()
    return cfg


def _model(cfg: ModelConfig) -> BertForMaskedLM:
    torch.manual_seed(0)
    model = BertForMaskedLM(cfg).double()
    with torch.no_grad():  # large random weights everywhere (biases and LayerNorms included)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def _inputs():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (B, S), generator=gen)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 2:] = 0
    types = torch.randint(0, 2, (B, S), generator=gen)
    return ids, mask, types


def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _moe(h, sd, name, cfg):
    """Per token: softmax router over all experts, top-k, gates renormalised, gate-weighted experts."""
    w_r = sd[f"{name}.router.weight"]
    w1, b1, w2, b2 = (sd[f"{name}.experts.{k}"] for k in ("w1", "b1", "w2", "b2"))
    out = torch.zeros_like(h)
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            x = h[b, t]
            probs = torch.softmax(w_r @ x, -1)
            gate, chosen = probs.topk(cfg.moe.top_k)
            gate = gate / gate.sum()
            for g, e in zip(gate, chosen):
                out[b, t] += g * (_gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e])
    return out


def reference_taps(sd: dict, cfg: ModelConfig, ids, mask, types) -> dict:
    eps, hd = cfg.layer_norm_eps, H // HEADS
    p = "bert.embeddings"
    x = sd[f"{p}.word_embeddings.weight"][ids] + sd[f"{p}.position_embeddings.weight"][:S] \
        + sd[f"{p}.token_type_embeddings.weight"][types]
    x = _layer_norm(x, sd[f"{p}.LayerNorm.weight"], sd[f"{p}.LayerNorm.bias"], eps)
    taps = {("T", 0, "out"): x}
    key_ok = mask.bool()[:, None, None, :]
    for i in range(cfg.num_layers):
        p = f"bert.encoder.layer.{i}"
        heads = {n: _linear(x, sd, f"{p}.attention.self.{m}").reshape(B, S, HEADS, hd).transpose(1, 2)
                 for n, m in (("q", "query"), ("k", "key"), ("v", "value"))}
        for n, t in heads.items():
            taps[("A", i + 1, n)] = t
        scores = (heads["q"] @ heads["k"].transpose(-1, -2) / math.sqrt(hd)).masked_fill(~key_ok, -math.inf)
        ctx = (scores.softmax(-1) @ heads["v"]).transpose(1, 2).reshape(B, S, H)
        attn = _linear(ctx, sd, f"{p}.attention.output.dense")
        taps[("I", i + 1, "attn")] = attn
        h = _layer_norm(attn + x, sd[f"{p}.attention.output.LayerNorm.weight"],
                        sd[f"{p}.attention.output.LayerNorm.bias"], eps)
        if cfg.is_moe_layer(i):
            ffn = _moe(h, sd, f"{p}.moe", cfg)
        else:
            ffn = _linear(_gelu(_linear(h, sd, f"{p}.intermediate.dense")), sd, f"{p}.output.dense")
        taps[("I", i + 1, "ffn")] = ffn
        x = _layer_norm(ffn + h, sd[f"{p}.output.LayerNorm.weight"], sd[f"{p}.output.LayerNorm.bias"], eps)
        taps[("T", i + 1, "out")] = x
    return taps


def _tol(cfg: ModelConfig) -> float:
    """float64 round-off, or the fp32 router's (its gates are fp32 by convention) in an MoE model."""
    return 1e-5 if cfg.moe.num_experts else 1e-10


def _assert_taps_equal(captured: dict, expected: dict, tol: float) -> None:
    assert sorted(captured) == sorted(expected)
    for key, want in expected.items():
        assert captured[key].shape == want.shape, key
        torch.testing.assert_close(captured[key], want, rtol=tol, atol=tol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_student_taps_equal_an_independent_recomputation(moe):
    cfg = _config(moe)
    model = _model(cfg).eval()
    assert moe == any(layer.is_moe for layer in model.bert.encoder.layer)
    ids, mask, types = _inputs()
    taps = Taps(tap_points(model))
    with taps, torch.no_grad():
        model(ids, mask, types)
    expected = reference_taps(model.state_dict(), cfg, ids, mask, types)
    _assert_taps_equal(taps.captured, expected, _tol(cfg))
    taps.remove()


def test_teacher_taps_equal_an_independent_recomputation():
    cfg = _config(False)
    model = _model(cfg)
    ids, mask, types = _inputs()
    expected = reference_taps(model.state_dict(), cfg, ids, mask, types)
    teacher = FrozenTeacher(model.bert, "TIA", True, cfg.num_layers)
    _assert_taps_equal(teacher(ids, mask, types), expected, _tol(cfg))


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_inner_taps_are_taken_before_dropout(moe):
    """In training, with heavy hidden dropout: I(attn) is exactly the output projection of the attention
    context recomputed from the captured A taps, and I(ffn) exactly the FFN / MoE of the input it was
    given; dropout (which zeroes about half the values and doubles the rest) comes after both taps."""
    cfg = _config(moe)
    cfg.hidden_dropout = 0.5
    model = _model(cfg).train()
    ids, mask, types = _inputs()
    ffn_in = {}
    hooks = [(layer.moe if layer.is_moe else layer.intermediate).register_forward_pre_hook(
        lambda m, args, i=i: ffn_in.setdefault(i, args[0])) for i, layer in enumerate(model.bert.encoder.layer)]
    taps = Taps(tap_points(model))
    torch.manual_seed(5)
    with taps, torch.no_grad():
        model(ids, mask, types)
    for hook in hooks:
        hook.remove()
    sd, hd = model.state_dict(), H // HEADS
    key_ok = mask.bool()[:, None, None, :]
    for i in range(cfg.num_layers):
        p = f"bert.encoder.layer.{i}"
        q, k, v = (taps.captured[("A", i + 1, n)] for n in "qkv")
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~key_ok, -math.inf)
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, H)
        torch.testing.assert_close(taps.captured[("I", i + 1, "attn")], _linear(ctx, sd, f"{p}.attention.output.dense"),
                                   rtol=1e-10, atol=1e-10)
        h = ffn_in[i]
        want = _moe(h, sd, f"{p}.moe", cfg) if cfg.is_moe_layer(i) else _linear(
            _gelu(_linear(h, sd, f"{p}.intermediate.dense")), sd, f"{p}.output.dense")
        torch.testing.assert_close(taps.captured[("I", i + 1, "ffn")], want, rtol=_tol(cfg), atol=_tol(cfg))
    taps.remove()
