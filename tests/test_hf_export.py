"""An MoE (or pre-LN) export is a `transformers` custom-code model: config.json's `auto_map` and the
modeling file beside the weights load it through the Auto classes, with our logits, losses and
gradients; a dense post-LN export stays a plain Hugging Face BERT."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import transformers.dynamic_module_utils as dynamic_module_utils

from tcd_ds import atomic
from tcd_ds.config import ModelConfig, MoEConfig
from tcd_ds.model.bert import BertForMaskedLM, BertForSequenceClassification
from tcd_ds.model.hf import REMOTE_CODE_FILE, load_hf_state_dict, read_pretrained, save_pretrained

SMALL = dict(vocab_size=120, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, max_position=64)
AUTO_CLASSES = {"AutoConfig", "AutoModel", "AutoModelForMaskedLM", "AutoModelForSequenceClassification"}

CONFIGS = {
    # every layer MoE, top-1, dropless
    "all-moe-top1": dict(moe=MoEConfig(num_experts=4, top_k=1)),
    # only layer 1 of 3 is MoE, top-2 with renormalised gates, tokens dropped for capacity in eval, z-loss
    "some-moe-top2-capacity": dict(moe=MoEConfig(num_experts=4, top_k=2, moe_every=2, eval_capacity_factor=0.5,
                                                 min_capacity=1, z_loss_weight=0.001)),
    # a pre-LN MoE student (final_norm, input LayerNorms)
    "pre-ln-moe": dict(moe=MoEConfig(num_experts=3, top_k=2, normalize_top_k=False), layer_norm="pre"),
    # rotary positions (no position embeddings): padding in the batch, so the rotation's positions show
    "rotary-moe": dict(moe=MoEConfig(num_experts=4, top_k=1), position_encoding="rotary"),
}


@pytest.fixture(autouse=True)
def hf_modules_cache(tmp_path, monkeypatch):
    """transformers copies custom code into its modules cache: keep it in the test's directory."""
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # init_hf_modules appends the cache to sys.path


def batch(seed: int = 0, b: int = 4, s: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = torch.zeros(b, s, dtype=torch.long)
    types[:, s // 2:] = 1
    return ids, mask, types


def export(tmp_path: Path, name: str, seed: int = 0, **model) -> tuple[BertForMaskedLM, Path]:
    torch.manual_seed(seed)
    cfg = ModelConfig(**SMALL, **model)
    ours = BertForMaskedLM(cfg).eval()
    with torch.no_grad():  # non-zero biases and LayerNorms, so a bias or norm left out would show
        for n, p in ours.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n or "norm" in n or n.endswith(".b1") or n.endswith(".b2"):
                p.add_(torch.randn_like(p) * 0.1)
    return ours, save_pretrained(ours, cfg, tmp_path / name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_moe_export_loads_through_automodelformaskedlm_with_our_logits(tmp_path, name):
    ours, out = export(tmp_path, name, **CONFIGS[name])
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["model_type"] == "tcd_moe_bert" and set(hf_config["auto_map"]) == AUTO_CLASSES
    assert (out / REMOTE_CODE_FILE).is_file()

    model, info = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True,
                                                                    output_loading_info=True)
    assert type(model).__name__ == "TcdMoeBertForMaskedLM" and not model.training
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight  # tied
    assert sum(hasattr(layer, "moe") for layer in model.bert.encoder.layer) == \
        sum(ours.config.is_moe_layer(i) for i in range(3))

    ids, mask, types = batch(1)
    labels = torch.full_like(ids, -100)
    labels[:, 1::3] = ids[:, 1::3]
    with torch.no_grad():
        want = ours(ids, mask, types, labels=labels, masked_only=True)
        want_logits = ours(ids, mask, types).logits
        got = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    torch.testing.assert_close(got.logits, want_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)  # MLM + router losses
    assert want.aux_loss > 0
    if ours.config.moe.eval_capacity_factor:  # the capacity path ran: some assignments were dropped
        assert any(s.dropped > 0 for s in want.moe_stats)


def test_moe_export_loads_through_automodelforsequenceclassification(tmp_path):
    _, out = export(tmp_path, "student", seed=1, **CONFIGS["some-moe-top2-capacity"])
    torch.manual_seed(7)
    clf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, trust_remote_code=True, num_labels=2, output_loading_info=True)
    assert type(clf).__name__ == "TcdMoeBertForSequenceClassification" and clf.classifier.out_features == 2
    # only the new heads are missing; the export's MLM head is not reported as unexpected
    assert info["missing_keys"] == {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                    "classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    std = clf.classifier.weight.std().item()  # initialised as BERT's heads (normal(0, 0.02), zero bias)
    assert 0.01 < std < 0.03 and torch.all(clf.classifier.bias == 0) and torch.all(clf.bert.pooler.dense.bias == 0)
    _, sd = read_pretrained(out)
    for k, v in clf.state_dict().items():
        if k in sd:
            assert torch.equal(v, sd[k]), k

    ours = BertForSequenceClassification(read_pretrained(out)[0], num_labels=2).eval()
    load_hf_state_dict(ours, clf.state_dict())  # the same pooler and classifier
    clf.eval()
    ids, mask, types = batch(2)
    labels = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        loss, logits, aux = ours(ids, mask, types, labels=labels)
        got = clf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    torch.testing.assert_close(got.logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.aux_loss, aux, atol=1e-6, rtol=1e-5)


def test_moe_export_loads_through_automodel(tmp_path):
    ours, out = export(tmp_path, "student", seed=2, **CONFIGS["pre-ln-moe"])
    encoder, info = transformers.AutoModel.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert type(encoder).__name__ == "TcdMoeBertModel"
    assert info["missing_keys"] == {"pooler.dense.weight", "pooler.dense.bias"} and not info["unexpected_keys"]
    ids, mask, types = batch(6)
    with torch.no_grad():
        got = encoder(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        want = ours.bert(ids, mask, types)
    torch.testing.assert_close(got.last_hidden_state, want.hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=1e-5)
    assert len(got.hidden_states) == 4 and got.hidden_states[-1] is got.last_hidden_state


def test_training_mode_matches_ours_loss_and_gradients(tmp_path):
    """Fine-tuning through transformers optimises what ours does: capacity in training, router jitter,
    the router losses in the loss, and the same gradients for every weight."""
    moe = MoEConfig(num_experts=4, top_k=2, moe_every=1, capacity_factor=0.75, min_capacity=1, jitter=0.1,
                    z_loss_weight=0.01)
    ours, out = export(tmp_path, "train", seed=3, moe=moe, hidden_dropout=0.0, attention_dropout=0.0)
    model = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).train()
    ours.train()
    ids, mask, types = batch(3)
    labels = torch.full_like(ids, -100)
    labels[:, ::2] = ids[:, ::2]
    torch.manual_seed(11)
    want = ours(ids, mask, types, labels=labels)
    torch.manual_seed(11)
    got = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert any(s.dropped > 0 for s in want.moe_stats)  # capacity binds in training
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    want.loss.backward()
    got.loss.backward()
    theirs = dict(model.named_parameters())
    mine = dict(ours.named_parameters())
    assert set(mine) == set(theirs)
    for name, p in mine.items():
        torch.testing.assert_close(theirs[name].grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_end_of_run_export_carries_the_modeling_file(tmp_path):
    """A run's export (tcd_ds.train: checkpoint.export_checkpoint of the final checkpoint) is one too."""
    from tcd_ds import checkpoint
    from tcd_ds.model.hf import config_to_hf

    torch.manual_seed(5)
    cfg = ModelConfig(**SMALL, moe=MoEConfig(num_experts=4, top_k=2, moe_every=2))
    ours = BertForMaskedLM(cfg).eval()
    tag = tmp_path / "run" / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    torch.save({"module": ours.state_dict(), "global_steps": 1}, tag / "mp_rank_00_model_states.pt")
    (tag / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    out = checkpoint.export_checkpoint(tag, tmp_path / "run" / "export")
    model = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True)
    ids, mask, types = batch(7)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits,
                                   ours(ids, mask, types).logits, atol=1e-5, rtol=0)


def test_moe_export_needs_trust_remote_code(tmp_path):
    """Never silently a BERT without its experts: transformers refuses the export without the opt-in."""
    _, out = export(tmp_path, "student", moe=MoEConfig(num_experts=2))
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=False)


def test_dense_export_stays_a_plain_bert(tmp_path):
    """A dense post-LN export has no custom code; a stale modeling file from an earlier MoE export
    into the same directory is removed. (Its logits equal transformers' BERT: tests/test_model.py.)"""
    _, out = export(tmp_path, "export", moe=MoEConfig(num_experts=2))
    assert (out / REMOTE_CODE_FILE).is_file()
    _, out = export(tmp_path, "export")
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["model_type"] == "bert" and hf_config["architectures"] == ["BertForMaskedLM"]
    assert "auto_map" not in hf_config and not (out / REMOTE_CODE_FILE).exists()
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(model) is transformers.BertForMaskedLM and not info["missing_keys"]


def test_hf_saved_model_reads_back_in_tcd_ds(tmp_path):
    """A model loaded (and, say, fine-tuned) through transformers and saved with its save_pretrained is
    again an export: our reader and the Auto classes both load it."""
    ours, out = export(tmp_path, "student", **CONFIGS["some-moe-top2-capacity"])
    model = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True)
    model.save_pretrained(tmp_path / "resaved")
    cfg, sd = read_pretrained(tmp_path / "resaved")
    assert cfg.moe == ours.config.moe and cfg.num_layers == 3
    again = BertForMaskedLM(cfg).eval()
    load_hf_state_dict(again, sd)
    ids, mask, types = batch(4)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask, types).logits, ours(ids, mask, types).logits, atol=0, rtol=0)


def test_export_files_get_the_users_mode(tmp_path):
    old = os.umask(0o027)
    try:
        _, out = export(tmp_path, "student", moe=MoEConfig(num_experts=2))
        expected = atomic.user_file_mode()
    finally:
        os.umask(old)
    assert expected == 0o640
    for name in ("model.safetensors", "config.json", REMOTE_CODE_FILE):
        assert (out / name).stat().st_mode & 0o777 == expected, name


def test_modeling_file_imports_only_torch_and_transformers(tmp_path):
    _, out = export(tmp_path, "student", moe=MoEConfig(num_experts=2))
    tree = ast.parse((out / REMOTE_CODE_FILE).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports: the file stands alone"
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "math", "dataclasses", "typing", "torch", "transformers"}, imported


_ANYWHERE = """
import sys
sys.modules["tcd_ds"] = None  # the export must not need tcd-ds
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification
ids, mask, types = torch.load("batch.pt")
mlm = AutoModelForMaskedLM.from_pretrained("moe-student", trust_remote_code=True)
clf = AutoModelForSequenceClassification.from_pretrained("moe-student", trust_remote_code=True, num_labels=2)
with torch.no_grad():
    logits = mlm(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert clf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.shape == (ids.shape[0], 2)
torch.save(logits, "logits.pt")
"""


@pytest.mark.slow
@pytest.mark.multiproc
def test_export_runs_anywhere_without_tcd_ds_offline(tmp_path):
    ours, out = export(tmp_path, "student", **CONFIGS["some-moe-top2-capacity"])
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out, elsewhere / "moe-student")
    ids, mask, types = batch(5)
    torch.save((ids, mask, types), elsewhere / "batch.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _ANYWHERE], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        want = ours(ids, mask, types).logits
    torch.testing.assert_close(torch.load(elsewhere / "logits.pt"), want, atol=1e-5, rtol=0)
