"""`model.layer_norm`: pre-LN computes the pre-LN layer (pinned by a float64 re-computation from the
weights, written without the model's modules), post-LN stays BERT's, and both survive an export."""
import math

import pytest
import torch
import torch.nn.functional as F

from tcd_ds.config import ConfigError, ModelConfig, MoEConfig
from tcd_ds.model.bert import BertForMaskedLM
from tcd_ds.model.hf import read_pretrained, save_pretrained


def config(layer_norm: str, **kw) -> ModelConfig:
    cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24,
                      max_position=12, hidden_dropout=0.0, attention_dropout=0.0, layer_norm=layer_norm, **kw)
    cfg.validate()
    return cfg


def ln(x, module):
    return F.layer_norm(x, x.shape[-1:], module.weight.double(), module.bias.double(), module.eps)


def lin(x, module):
    return x @ module.weight.double().T + module.bias.double()


def attention(x, att, heads):
    b, s, h = x.shape
    q, k, v = (lin(x, m).reshape(b, s, heads, h // heads).transpose(1, 2) for m in (att.query, att.key, att.value))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(h // heads), dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, s, h)


def reference(model: BertForMaskedLM, ids: torch.Tensor, pre: bool) -> torch.Tensor:
    """The encoder's output in float64, from the definitions."""
    e = model.bert.embeddings
    x = e.word_embeddings.weight.double()[ids] + e.position_embeddings.weight.double()[: ids.shape[1]]
    x = ln(x + e.token_type_embeddings.weight.double()[0], e.LayerNorm)
    for layer in model.bert.encoder.layer:
        a, o = layer.attention.self, layer.attention.output
        if pre:
            h = x + lin(attention(ln(x, o.LayerNorm), a, 2), o.dense)
            f = ln(h, layer.output.LayerNorm)
            x = h + lin(F.gelu(lin(f, layer.intermediate.dense)), layer.output.dense)
        else:
            h = ln(x + lin(attention(x, a, 2), o.dense), o.LayerNorm)
            x = ln(h + lin(F.gelu(lin(h, layer.intermediate.dense)), layer.output.dense), layer.output.LayerNorm)
    return ln(x, model.bert.encoder.final_norm) if pre and hasattr(model.bert.encoder, "final_norm") else x


@pytest.mark.parametrize("layer_norm", ["post", "pre"])
def test_layer_matches_its_definition(layer_norm):
    torch.manual_seed(0)
    model = BertForMaskedLM(config(layer_norm)).double().eval()
    with torch.no_grad():  # LayerNorms away from (1, 0), so a misplaced norm shows
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    ids = torch.randint(5, 50, (3, 10))
    got = model.bert(ids).hidden
    torch.testing.assert_close(got, reference(model, ids, layer_norm == "pre"), rtol=1e-10, atol=1e-10)
    # and the two are different functions of the same weights
    assert not torch.allclose(reference(model, ids, True), reference(model, ids, False), atol=1e-3)
    assert hasattr(model.bert.encoder, "final_norm") is (layer_norm == "pre")


def test_teacher_prefix_skips_the_final_norm():
    """A teacher stopped at an inner layer (num_layers) returns that layer's residual stream."""
    torch.manual_seed(0)
    model = BertForMaskedLM(config("pre")).eval()
    ids = torch.randint(5, 50, (2, 8))
    with torch.no_grad():
        x = model.bert.embeddings(ids)
        x, _ = model.bert.encoder.layer[0](x, None)
        torch.testing.assert_close(model.bert(ids, num_layers=1).hidden, x)


@pytest.mark.parametrize("moe", [0, 4])
def test_export_keeps_the_layer_norm(tmp_path, moe):
    torch.manual_seed(0)
    cfg = config("pre", moe=MoEConfig(num_experts=moe, top_k=1) if moe else MoEConfig())
    model = BertForMaskedLM(cfg).eval()
    save_pretrained(model, cfg, tmp_path)
    loaded_cfg, sd = read_pretrained(tmp_path)
    assert loaded_cfg.layer_norm == "pre"
    assert "bert.encoder.final_norm.weight" in sd
    again = BertForMaskedLM(loaded_cfg).eval()
    again.load_state_dict({k: v for k, v in sd.items()}, strict=False)
    ids = torch.randint(5, 50, (2, 8))
    torch.testing.assert_close(again.bert(ids).hidden, model.bert(ids).hidden)


def test_unknown_layer_norm_is_refused():
    with pytest.raises(ConfigError, match="model.layer_norm must be post or pre"):
        config("sandwich")
