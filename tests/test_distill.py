"""Taps (T/I/A) on ours and transformers' BERT, the frozen teacher, and the TCD objective."""
from __future__ import annotations

import pytest
import torch
import transformers

from tcd_ds.config import DistillConfig, ModelConfig, MoEConfig
from tcd_ds.distill.objective import RelationObjective, check_compatible
from tcd_ds.distill.relation import relation_loss
from tcd_ds.distill.taps import Taps, tap_points
from tcd_ds.distill.teacher import FrozenTeacher, load_teacher
from tcd_ds.model.bert import BertForMaskedLM, BertModel
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
    teacher = load_teacher(tmp_path / "hf", DistillConfig(), dtype="fp32")  # against transformers in fp32
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


def _refusal(student: ModelConfig, teacher: ModelConfig, distill: DistillConfig) -> str:
    with pytest.raises(CheckpointError) as err:
        check_compatible(student, teacher, distill)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_compatibility_checks_name_the_mismatch():
    student = ModelConfig(**SMALL)
    assert _refusal(student, ModelConfig(**{**SMALL, "vocab_size": 99}), DistillConfig()) == \
        "teacher vocab_size 99 != student vocab_size 120: they must share the tokenizer"
    assert _refusal(student, ModelConfig(**{**SMALL, "num_heads": 8}), DistillConfig(positions="A")) == \
        ("teacher num_heads 8 != student num_heads 4: A aligns per attention head; set distill.relation_heads to a "
         "number of relation heads dividing both hidden sizes (32, 32)")
    assert _refusal(student, ModelConfig(**{**SMALL, "hidden_size": 48, "num_heads": 8}),
                    DistillConfig(relation_heads=32)) == \
        "distill.relation_heads=32 must divide the student hidden_size 32 and the teacher hidden_size 48"
    assert _refusal(student, ModelConfig(**{**SMALL, "hidden_size": 64}), DistillConfig(impl="gram")) == \
        ("distill.impl=gram loses precision when widths differ (T: student 32, teacher 64); "
         "set distill.impl=auto or naive")
    # what aligns: other widths (T, I and per-head A), other head counts through relation heads
    for teacher in (ModelConfig(**{**SMALL, "hidden_size": 64}), ModelConfig(**{**SMALL, "hidden_size": 16})):
        check_compatible(student, teacher, DistillConfig())
    check_compatible(student, ModelConfig(**{**SMALL, "hidden_size": 48, "num_heads": 12}),
                     DistillConfig(relation_heads=8))
    check_compatible(student, ModelConfig(**SMALL), DistillConfig(impl="gram"))


def _ref_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float64 MSE relation loss, one valid-token cosine matrix per sequence (and per leading head dim)."""
    s, t = s.double(), t.double()
    if s.dim() == 3:
        s, t = s[:, None], t[:, None]
    losses = []
    for b in range(s.shape[0]):
        idx = mask[b].bool()
        for h in range(s.shape[1]):
            cs, ct = (torch.nn.functional.normalize(x[b, h, idx], dim=-1) for x in (s, t))
            losses.append(((cs @ cs.T - ct @ ct.T) ** 2).sum() / int(idx.sum()) ** 2)
    return torch.stack(losses).mean()


def _tapped_pair(student_cfg: ModelConfig, teacher_cfg: ModelConfig, distill: DistillConfig, seed: int = 0):
    """Student and teacher (float64) taps of one batch, and each model's Q/K/V projection outputs
    `[B, S, hidden]` (by forward hooks, for the references)."""
    ids, mask = batch(seed)
    torch.manual_seed(seed)
    student = BertForMaskedLM(student_cfg).double().eval()
    teacher = FrozenTeacher(BertModel(teacher_cfg).double(), distill.positions, distill.include_embeddings,
                            teacher_cfg.num_layers)
    projections = {}

    def keep(side, layer, name):
        return lambda m, args, out: projections.setdefault((side, layer, name), out.detach())

    hooks = []
    for side, bert in (("s", student.bert), ("t", teacher.encoder)):
        for i, layer in enumerate(bert.encoder.layer, start=1):
            for name in "qkv":
                module = getattr(layer.attention.self, {"q": "query", "k": "key", "v": "value"}[name])
                hooks.append(module.register_forward_hook(keep(side, i, name)))
    taps = Taps(tap_points(student, distill.positions, distill.include_embeddings))
    with torch.no_grad(), taps:
        student(ids, mask)
    teacher_taps = teacher(ids, mask)
    for h in hooks:
        h.remove()
    return taps.captured, teacher_taps, projections, mask


@pytest.mark.parametrize("teacher_hidden", [64, 16], ids=["wider-teacher", "narrower-teacher"])
def test_teachers_of_another_width_align_T_I_and_A(teacher_hidden):
    """A teacher wider or narrower than the student: T, I and per-head A relations are L x L whatever the
    widths, and every term equals its float64 reference on the very tensors tapped."""
    student_cfg = ModelConfig(**SMALL)
    teacher_cfg = ModelConfig(**{**SMALL, "hidden_size": teacher_hidden, "intermediate_size": 2 * teacher_hidden})
    distill = DistillConfig()
    check_compatible(student_cfg, teacher_cfg, distill)  # what the trainer checks before any compute
    s, t, _, mask = _tapped_pair(student_cfg, teacher_cfg, distill)
    assert s[("T", 1, "out")].shape[-1] == 32 and t[("T", 1, "out")].shape[-1] == teacher_hidden
    total, terms = RelationObjective(distill, 3, 3)(s, t, mask)
    for (position, layer, name), x in s.items():
        key = f"{position}/{layer}" + ("" if name == "out" else f"/{name}")
        want = _ref_mse(x, t[(position, layer, name)], mask)
        assert terms[key].item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12), key
    assert total.item() == pytest.approx(sum(terms[p].item() for p in "TIA"), rel=1e-9)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_relation_heads_align_A_across_head_counts(n):
    """MiniLMv2 relation heads: a 4-head teacher of width 32 and a 2-head student of width 16. Q, K and V
    (heads concatenated, [B, S, hidden]) are split into n relation heads on both sides; each A term equals
    the float64 mean over sequences and relation heads of the cosine-relation MSE of those splits."""
    student_cfg = ModelConfig(**{**SMALL, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32})
    teacher_cfg = ModelConfig(**SMALL)
    distill = DistillConfig(positions="A", relation_heads=n)
    check_compatible(student_cfg, teacher_cfg, distill)
    s, t, proj, mask = _tapped_pair(student_cfg, teacher_cfg, distill, seed=2)
    _, terms = RelationObjective(distill, 3, 3)(s, t, mask)
    b, length = mask.shape
    for layer in (1, 2, 3):
        for name in "qkv":
            split = [proj[(side, layer, name)].reshape(b, length, n, -1).transpose(1, 2) for side in "st"]
            want = _ref_mse(*split, mask)
            assert terms[f"A/{layer}/{name}"].item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)


def test_relation_heads_equal_per_head_when_counts_match():
    """With equal head counts, relation_heads = num_heads is the per-head alignment (the default) exactly."""
    cfg = ModelConfig(**SMALL)
    s, t, _, mask = _tapped_pair(cfg, ModelConfig(**{**SMALL, "hidden_size": 64}), DistillConfig(positions="A"))
    per_head = RelationObjective(DistillConfig(positions="A"), 3, 3)(s, t, mask)[1]
    relation = RelationObjective(DistillConfig(positions="A", relation_heads=4), 3, 3)(s, t, mask)[1]
    assert per_head.keys() == relation.keys()
    for k in per_head:
        assert torch.equal(per_head[k], relation[k]), k
    two = RelationObjective(DistillConfig(positions="A", relation_heads=2), 3, 3)(s, t, mask)[1]
    assert not torch.equal(two["A"], per_head["A"])  # another split is another loss


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


def test_relation_heads_config_is_validated():
    from tcd_ds.config import ConfigError, build_config

    assert build_config("tiny", ["mode=moe", "distill.relation_heads=4"]).distill.relation_heads == 4
    with pytest.raises(ConfigError) as err:
        build_config("tiny", ["mode=moe", "distill.relation_heads=-1"])
    assert str(err.value) == "distill.relation_heads must be >= 0 (0 = per attention head), got -1"


def test_the_trainers_step_gives_the_teacher_the_attention_mask():
    """`forward_loss` (the trainer's micro-batch) on a padded batch equals the objective computed from
    a separate student forward and a separate teacher call with the mask. Without the mask the padded
    rows' teacher attends to padding and gives other relations, which every other test missed."""
    from tcd_ds.train import forward_loss

    torch.manual_seed(0)
    student_cfg = ModelConfig(**SMALL, hidden_dropout=0.0, attention_dropout=0.0,
                              moe=MoEConfig(num_experts=4, top_k=2))
    student = BertForMaskedLM(student_cfg)
    teacher_cfg = ModelConfig(**SMALL, hidden_dropout=0.0, attention_dropout=0.0)
    distill = DistillConfig()
    teacher = FrozenTeacher(BertModel(teacher_cfg), distill.positions, distill.include_embeddings, 3)
    objective = RelationObjective(distill, 3, 3)
    ids, mask = batch(1)
    labels = torch.where((torch.arange(ids.shape[1]) % 3 == 0) & (mask == 1), ids, -100)
    data = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}
    taps = Taps(tap_points(student, distill.positions, distill.include_embeddings))
    try:
        loss, parts, _ = forward_loss(student, data, taps, teacher, objective)
        with taps:
            out = student(ids, mask, data["token_type_ids"], labels=labels)
        student_states = dict(taps.captured)
    finally:
        taps.remove()
    rel, terms = objective(student_states, teacher(ids, mask, data["token_type_ids"]), mask)
    unmasked, _ = objective(student_states, teacher(ids, None, data["token_type_ids"]), mask)
    assert abs(unmasked.item() - rel.item()) > 1e-3 * rel.item()  # the mask matters for this batch
    torch.testing.assert_close(loss.detach(), (out.loss + rel).detach(), rtol=1e-6, atol=0)
    for key in ("T", "I", "A", "T/2", "A/1/q"):
        torch.testing.assert_close(parts[f"L_{key}"], terms[key], rtol=1e-6, atol=0, msg=key)
