"""Our BERT equals transformers' on the same weights; save/load round trips; masked-only head."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from tcd_ds.config import ModelConfig, MoEConfig
from tcd_ds.model import bert as bert_module
from tcd_ds.model.bert import BertForMaskedLM, BertForSequenceClassification, flops_per_token
from tcd_ds.model.hf import (CheckpointError, config_to_hf, load_hf_state_dict, read_pretrained,
                             save_pretrained, to_hf_state_dict)

SMALL = dict(vocab_size=120, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, max_position=64)


def hf_config(**overrides) -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64, **overrides)


def batch(seed: int = 0, b: int = 4, s: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    types = torch.zeros(b, s, dtype=torch.long)
    types[:, s // 2:] = 1
    return ids, mask, types


def test_mlm_logits_equal_transformers_with_padding():
    torch.manual_seed(0)
    ref = transformers.BertForMaskedLM(hf_config()).eval()
    ours = BertForMaskedLM(ModelConfig(**SMALL)).eval()
    load_hf_state_dict(ours, ref.state_dict())
    ids, mask, types = batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, mask, types).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5


def test_sequence_classification_equals_transformers():
    torch.manual_seed(1)
    ref = transformers.BertForSequenceClassification(hf_config(num_labels=3)).eval()
    ours = BertForSequenceClassification(ModelConfig(**SMALL), num_labels=3).eval()
    load_hf_state_dict(ours, ref.state_dict())
    ids, mask, types = batch(1)
    labels = torch.tensor([0, 2, 1, 1])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        loss, logits, aux = ours(ids, mask, types, labels=labels)
    assert (logits - want.logits).abs().max().item() < 1e-5
    assert abs(loss.item() - want.loss.item()) < 1e-5
    assert aux.item() == 0.0


def test_masked_only_head_matches_full_head():
    torch.manual_seed(2)
    model = BertForMaskedLM(ModelConfig(**SMALL)).eval()
    ids, mask, types = batch(2)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 5], labels[3, 0] = 7, 9, 11
    with torch.no_grad():
        fast = model(ids, mask, types, labels=labels)
        full = model(ids, mask, types, labels=labels, masked_only=False)
    assert fast.logits.shape == (3, 120)
    assert full.logits.shape == (4, 12, 120)
    assert torch.allclose(fast.logits, full.logits[labels != -100], atol=1e-6)
    assert abs(fast.mlm_loss.item() - full.mlm_loss.item()) < 1e-6
    assert fast.num_masked.item() == 3
    assert fast.correct.item() == full.correct.item()


def test_attention_runs_through_sdpa(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(bert_module.F, "scaled_dot_product_attention", counting)
    model = BertForMaskedLM(ModelConfig(**SMALL)).eval()
    ids, mask, types = batch()
    model(ids, mask, types)
    assert calls == [torch.Size([4, 4, 12, 8])] * 3  # [B, heads, S, head_dim], once per layer


def test_save_then_transformers_reads_the_dense_model(tmp_path):
    torch.manual_seed(3)
    cfg = ModelConfig(**SMALL)
    ours = BertForMaskedLM(cfg).eval()
    save_pretrained(ours, cfg, tmp_path)
    ref = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    ids, mask, types = batch(3)
    with torch.no_grad():
        diff = (ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits - ours(ids, mask, types).logits)
    assert diff.abs().max().item() < 1e-5


@pytest.mark.parametrize("backend", ["torch", "grouped"])
def test_moe_model_round_trip(tmp_path, backend):
    torch.manual_seed(4)
    cfg = ModelConfig(**SMALL, moe=MoEConfig(num_experts=4, top_k=2, moe_every=2, backend=backend))
    model = BertForMaskedLM(cfg).eval()
    save_pretrained(model, cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tcd_moe"]["num_experts"] == 4
    cfg2, sd = read_pretrained(tmp_path)
    assert cfg2.moe.num_experts == 4 and cfg2.moe.moe_every == 2 and cfg2.num_layers == 3
    again = BertForMaskedLM(cfg2).eval()
    load_hf_state_dict(again, sd)
    ids, mask, types = batch(4)
    with torch.no_grad():
        assert torch.equal(model(ids, mask, types).logits, again(ids, mask, types).logits)
    assert "bert.encoder.layer.1.moe.experts.w1" in sd and "bert.encoder.layer.0.moe.experts.w1" not in sd


def test_load_rejects_a_checkpoint_of_another_shape():
    ref = transformers.BertForMaskedLM(hf_config()).state_dict()
    bigger = BertForMaskedLM(ModelConfig(**{**SMALL, "hidden_size": 64}))
    with pytest.raises(CheckpointError, match=r"weight bert\.embeddings\.word_embeddings\.weight has shape \(120, 32\)"):
        load_hf_state_dict(bigger, ref)


def test_read_pretrained_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        read_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(ModelConfig(**SMALL))))
    with pytest.raises(CheckpointError, match="holds no weights"):
        read_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read the weights"):
        read_pretrained(tmp_path)


def test_activation_checkpointing_gives_same_loss_and_grads():
    torch.manual_seed(5)
    base = dict(SMALL, hidden_dropout=0.0, attention_dropout=0.0, moe=MoEConfig(num_experts=2))
    plain = BertForMaskedLM(ModelConfig(**base)).train()
    ckpt = BertForMaskedLM(ModelConfig(**base, activation_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    ids, mask, types = batch(5)
    labels = ids.clone()
    labels[:, ::2] = -100
    for m in (plain, ckpt):
        m(ids, mask, types, labels=labels).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_hf_state_dict_ties_decoder():
    model = BertForMaskedLM(ModelConfig(**SMALL))
    sd = to_hf_state_dict(model)
    assert torch.equal(sd["cls.predictions.decoder.weight"], sd["bert.embeddings.word_embeddings.weight"])
    assert model.cls.predictions.bias is not None


def test_flops_per_token_counts_active_experts_only():
    dense = ModelConfig(**SMALL)
    moe = ModelConfig(**SMALL, moe=MoEConfig(num_experts=64, top_k=1))
    h, e, n = 32, 64, 3
    # per layer the MoE FFN adds only its router (h*e multiply-adds per token) over the dense FFN
    assert flops_per_token(moe, 128) - flops_per_token(dense, 128) == pytest.approx(6 * n * h * e)
