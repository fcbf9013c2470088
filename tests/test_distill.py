"""Taps (T/I/A) on ours and transformers' BERT, the frozen teacher, and the TCD objective."""
from __future__ import annotations

import pytest
import torch
import transformers

from tcd_ds.config import DistillConfig, ModelConfig, MoEConfig
from tcd_ds.distill.objective import RelationObjective, check_compatible
from tcd_ds.distill.relation import relation_loss
from tcd_ds.distill.taps import Taps, tap_points
from tcd_ds.distill.teacher import load_teacher
from tcd_ds.model.bert import BertForMaskedLM
from tcd_ds.model.hf import CheckpointError, load_hf_state_dict, save_pretrained

SMALL = dict(vocab_size=120, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, max_position=64)


def batch(seed: int = 0, b: int = 3, s: int = 10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


def hf_model(seed: int = 0, layers: int = 3, hidden: int = 32) -> transformers.BertForMaskedLM:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertForMaskedLM(cfg).eval()


def test_tap_points_cover_every_position():
    model = BertForMaskedLM(ModelConfig(**SMALL, moe=MoEConfig(num_experts=2, moe_every=2)))
    keys = [p.key for p in tap_points(model)]
    assert keys.count(("T", 0, "out")) == 1
    assert [k for k in keys if k[0] == "T"] == [("T", i, "out") for i in range(4)]
    assert [k for k in keys if k[0] == "I"] == [("I", i, n) for i in (1, 2, 3) for n in ("attn", "ffn")]
    assert [k for k in keys if k[0] == "A"] == [("A", i, n) for i in (1, 2, 3) for n in "qkv"]
    moe_ffn = [p for p in tap_points(model) if p.key == ("I", 2, "ffn")][0]
    assert moe_ffn.module is model.bert.encoder.layer[1].moe


def test_taps_equal_between_ours_and_transformers():
    ref = hf_model()
    ours = BertForMaskedLM(ModelConfig(**SMALL)).eval()
    load_hf_state_dict(ours, ref.state_dict())
    ids, mask = batch()
    a, b = Taps(tap_points(ref)), Taps(tap_points(ours))
    with torch.no_grad():
        with a:
            hf_out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        with b:
            ours(ids, mask)
    assert set(a.captured) == set(b.captured) and len(a.captured) == 4 + 3 * 2 + 3 * 3
    for key, t in a.captured.items():
        assert t.shape == b.captured[key].shape, key
        assert (t - b.captured[key]).abs().max().item() < 1e-5, key
    # T taps are exactly the hidden states transformers reports
    for i, h in enumerate(hf_out.hidden_states):
        assert torch.allclose(a.captured[("T", i, "out")], h)
    assert a.captured[("A", 2, "q")].shape == (3, 4, 10, 8)  # [B, heads, S, head_dim]


def test_taps_capture_only_while_armed_and_remove_cleanly():
    model = BertForMaskedLM(ModelConfig(**SMALL)).eval()
    ids, mask = batch()
    taps = Taps(tap_points(model, positions="T"))
    model(ids, mask)
    assert taps.captured == {}
    with taps:
        model(ids, mask)
        first = taps.captured[("T", 3, "out")]
        model(ids.flip(1), mask)  # a second forward in the same window does not overwrite
    assert taps.captured[("T", 3, "out")] is first
    taps.remove()
    assert all(not m._forward_hooks for m in model.modules())


def test_two_tapped_models_do_not_share_state():
    m1, m2 = BertForMaskedLM(ModelConfig(**SMALL)).eval(), BertForMaskedLM(ModelConfig(**SMALL)).eval()
    t1, t2 = Taps(tap_points(m1)), Taps(tap_points(m2))
    ids, mask = batch()
    with t1:
        m1(ids, mask)
    assert t1.captured and not t2.captured
    with t2:
        m2(ids, mask)
    assert not torch.equal(t1.captured[("T", 1, "out")], t2.captured[("T", 1, "out")])


def _tcd_grads(checkpointing: bool, teacher_taps, ids, mask):
    torch.manual_seed(7)
    cfg = ModelConfig(**SMALL, hidden_dropout=0.0, attention_dropout=0.0, activation_checkpointing=checkpointing,
                      moe=MoEConfig(num_experts=2))
    student = BertForMaskedLM(cfg).train()
    taps = Taps(tap_points(student))
    objective = RelationObjective(DistillConfig(), 3, 3)
    with taps:
        out = student(ids, mask, labels=torch.where(mask.bool(), ids, -100))
    rel, terms = objective(taps.captured, teacher_taps, mask)
    (out.loss + rel).backward()
    captured = {k: v.detach().clone() for k, v in taps.captured.items()}
    return captured, {n: p.grad.clone() for n, p in student.named_parameters()}, terms


def test_taps_and_grads_identical_under_activation_checkpointing():
    ids, mask = batch(1)
    ref = hf_model(1)
    teacher = Taps(tap_points(ref))
    with torch.no_grad(), teacher:
        ref(input_ids=ids, attention_mask=mask)
    taps_a, grads_a, terms_a = _tcd_grads(False, teacher.captured, ids, mask)
    taps_b, grads_b, terms_b = _tcd_grads(True, teacher.captured, ids, mask)
    assert set(taps_a) == set(taps_b)
    for k in taps_a:
        assert torch.allclose(taps_a[k], taps_b[k], atol=1e-6), k
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-6), n
    assert all(torch.allclose(terms_a[k], terms_b[k]) for k in terms_a)


def test_teacher_loads_hf_dir_and_matches_transformers_taps(tmp_path):
    ref = hf_model(2)
    ref.save_pretrained(tmp_path / "hf")
    teacher = load_teacher(tmp_path / "hf", DistillConfig())
    ids, mask = batch(2)
    got = teacher(ids, mask)
    want = Taps(tap_points(ref))
    with torch.no_grad(), want:
        ref(input_ids=ids, attention_mask=mask)
    assert set(got) == set(want.captured)
    for k, v in want.captured.items():
        assert (got[k] - v).abs().max().item() < 1e-5, k
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not hasattr(teacher.encoder, "cls") and not hasattr(teacher, "cls")


def test_teacher_reads_pytorch_bin_and_bf16(tmp_path):
    ref = hf_model(3)
    ref.config.save_pretrained(tmp_path)  # an older HF layout: config.json + pytorch_model.bin
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    teacher = load_teacher(tmp_path, DistillConfig(positions="T"), dtype="bf16")
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    ids, mask = batch(3)
    assert teacher(ids, mask)[("T", 3, "out")].dtype == torch.bfloat16


def test_teacher_never_changes_and_gets_no_grad(tmp_path):
    torch.manual_seed(0)
    tcfg = ModelConfig(**SMALL)
    save_pretrained(BertForMaskedLM(tcfg), tcfg, tmp_path / "teacher")
    distill = DistillConfig()
    teacher = load_teacher(tmp_path / "teacher", distill)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = BertForMaskedLM(ModelConfig(**SMALL, hidden_dropout=0.0, attention_dropout=0.0,
                                          moe=MoEConfig(num_experts=4))).train()
    taps = Taps(tap_points(student))
    objective = RelationObjective(distill, 3, 3)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    ids, mask = batch(4)
    teacher.train()  # a trainer calling .train() on everything must not enable teacher dropout
    assert not teacher.training and not teacher.encoder.training
    losses = []
    for _ in range(5):
        with taps:
            out = student(ids, mask, labels=torch.where(mask.bool(), ids, -100))
        rel, _ = objective(taps.captured, teacher(ids, mask), mask)
        (0.01 * out.loss + rel).backward()
        opt.step()
        opt.zero_grad()
        losses.append(rel.item())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert losses[-1] < losses[0]  # the student moves towards the teacher's relations


def test_teacher_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher(tmp_path / "nope", DistillConfig())
    moe_cfg = ModelConfig(**SMALL, moe=MoEConfig(num_experts=2))
    save_pretrained(BertForMaskedLM(moe_cfg), moe_cfg, tmp_path / "moe")
    with pytest.raises(CheckpointError, match="is an MoE model"):
        load_teacher(tmp_path / "moe", DistillConfig())
    hf_model().save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="fp16 is for GPUs"):
        load_teacher(tmp_path / "hf", DistillConfig(), dtype="fp16")


def test_compatibility_checks_name_the_mismatch():
    student = ModelConfig(**SMALL)
    with pytest.raises(CheckpointError, match="teacher hidden_size 64 != student hidden_size 32"):
        check_compatible(student, ModelConfig(**{**SMALL, "hidden_size": 64}), DistillConfig())
    with pytest.raises(CheckpointError, match="teacher vocab_size 99 != student vocab_size 120"):
        check_compatible(student, ModelConfig(**{**SMALL, "vocab_size": 99}), DistillConfig())
    with pytest.raises(CheckpointError, match="num_heads 8 != student num_heads 4"):
        check_compatible(student, ModelConfig(**{**SMALL, "num_heads": 8}), DistillConfig(positions="A"))
    check_compatible(student, ModelConfig(**{**SMALL, "hidden_size": 64}), DistillConfig(positions="A"))


def test_objective_averages_positions_and_maps_layers():
    ids, mask = batch(5)
    teacher_model = hf_model(5, layers=6)
    teacher = Taps(tap_points(teacher_model))
    with torch.no_grad(), teacher:
        teacher_model(input_ids=ids, attention_mask=mask)
    student = BertForMaskedLM(ModelConfig(**SMALL)).eval()
    taps = Taps(tap_points(student))
    with torch.no_grad(), taps:
        student(ids, mask)
    cfg = DistillConfig(weight_t=2.0, weight_i=0.5, weight_a=0.0)
    objective = RelationObjective(cfg, 3, 6)
    assert objective.layer_map == [0, 2, 4, 6]
    total, terms = objective(taps.captured, teacher.captured, mask)
    t3 = relation_loss(taps.captured[("T", 3, "out")], teacher.captured[("T", 6, "out")], mask)
    assert terms["T/3"].item() == pytest.approx(t3.item())
    assert terms["T"].item() == pytest.approx(sum(terms[f"T/{i}"].item() for i in range(4)) / 4)
    assert terms["A"].item() == pytest.approx(
        sum(terms[f"A/{i}/{n}"].item() for i in (1, 2, 3) for n in "qkv") / 9)
    assert total.item() == pytest.approx(2.0 * terms["T"].item() + 0.5 * terms["I"].item(), rel=1e-6)
