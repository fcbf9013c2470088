"""`model.position_encoding=rotary`: RoFormer's rotation of Q and K, pinned against its complex-number
definition in float64; the attention sees relative positions only; exports keep it."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tcd_ds.config import ConfigError, ModelConfig
from tcd_ds.model.bert import BertForMaskedLM, rotate_positions
from tcd_ds.model.hf import read_pretrained, save_pretrained


def config(**kw) -> ModelConfig:
    cfg = ModelConfig(vocab_size=60, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24,
                      max_position=20, hidden_dropout=0.0, attention_dropout=0.0, position_encoding="rotary", **kw)
    cfg.validate()
    return cfg


def test_rotation_is_roformers_complex_product():
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    d = x.shape[-1]
    z = torch.complex(x[..., 0::2], x[..., 1::2])  # pair (2i, 2i+1) as one complex number
    theta = torch.tensor([10000.0 ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    p = torch.arange(7, dtype=torch.float64)[:, None]
    want = z * torch.exp(1j * p * theta)
    got = rotate_positions(x)
    torch.testing.assert_close(got[..., 0::2], want.real)
    torch.testing.assert_close(got[..., 1::2], want.imag)


def test_scores_depend_on_relative_positions_only():
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    seq = lambda v: v.expand(1, 1, 12, 8)  # the same vector at every position
    scores = rotate_positions(seq(q)) @ rotate_positions(seq(k)).transpose(-1, -2)
    for offset in range(-5, 6):
        diagonal = torch.diagonal(scores[0, 0], offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal))
    assert not torch.allclose(torch.diagonal(scores[0, 0], 1)[0], torch.diagonal(scores[0, 0], 3)[0])


def test_model_has_no_position_table_and_attends_by_rotation():
    torch.manual_seed(0)
    model = BertForMaskedLM(config(initializer_range=0.5)).double().eval()  # attention far from uniform
    assert not any("position_embeddings" in n for n, _ in model.named_parameters())
    ids = torch.randint(5, 60, (2, 9))
    att = model.bert.encoder.layer[0].attention.self
    x = model.bert.embeddings(ids)
    e = model.bert.embeddings
    torch.testing.assert_close(x, F.layer_norm(e.word_embeddings.weight[ids] + e.token_type_embeddings.weight[0],
                                                (16,), e.LayerNorm.weight, e.LayerNorm.bias, e.LayerNorm.eps))
    heads = lambda t: t.reshape(2, 9, 2, 8).transpose(1, 2)
    q, k, v = (heads(lin(x)) for lin in (att.query, att.key, att.value))
    q, k = rotate_positions(q), rotate_positions(k)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(att(x, None), (w @ v).transpose(1, 2).reshape(2, 9, 16))
    # without the rotation the encoder would be blind to order: with it, order matters
    flipped = model.bert(ids.flip(1)).hidden.flip(1)
    assert not torch.allclose(model.bert(ids).hidden, flipped, atol=1e-4)


def test_export_keeps_rotary_and_carries_the_modeling_file(tmp_path):
    torch.manual_seed(0)
    cfg = config()
    model = BertForMaskedLM(cfg).eval()
    out = save_pretrained(model, cfg, tmp_path / "export")
    hf = json.loads((out / "config.json").read_text())
    assert hf["position_embedding_type"] == "rotary" and hf["model_type"] != "bert" and "auto_map" in hf
    loaded_cfg, sd = read_pretrained(out)
    assert loaded_cfg.position_encoding == "rotary"
    again = BertForMaskedLM(loaded_cfg).eval()
    again.load_state_dict(sd, strict=False)
    ids = torch.randint(5, 60, (2, 8))
    torch.testing.assert_close(again.bert(ids).hidden, model.bert(ids).hidden)


def test_rotary_needs_an_even_head_dim_and_no_position_init():
    with pytest.raises(ConfigError, match="even head dimension"):
        config(position_init="sinusoidal")
    with pytest.raises(ConfigError, match="even head dimension"):
        ModelConfig(hidden_size=18, num_heads=6, position_encoding="rotary").validate()
    with pytest.raises(ConfigError, match="position_encoding must be absolute or rotary"):
        ModelConfig(position_encoding="alibi").validate()
