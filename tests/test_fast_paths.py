"""Fast paths against their references: written-out relation-loss gradients vs autograd, batched
relation losses vs one call per pair, the objective vs a per-pair loop, the expert loop with its
written-out backward vs autograd through the same loop and vs a per-token definition, and taps that
leave attention on the fused SDPA kernel."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tcd_ds.model.bert as bert_module
from tcd_ds.config import DistillConfig, ModelConfig, MoEConfig
from tcd_ds.distill import relation as rel
from tcd_ds.distill.objective import RelationObjective
from tcd_ds.distill.taps import Taps, tap_points
from tcd_ds.model.bert import BertForMaskedLM
from tcd_ds.model.moe import build_moe


def _inputs(shape_s, dt=None, dtype=torch.float32, seed=0, pad=True):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape_s, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.randn(*shape_s[:-1], dt or shape_s[-1], generator=gen, dtype=torch.float64).to(dtype)
    b, length = shape_s[0], shape_s[-2]
    mask = torch.ones(b, length, dtype=torch.bool)
    if pad:
        mask[0, length // 2:] = False
        mask[-1, 1:] = False  # one valid token
        if b > 2:
            mask[1] = False  # an empty sequence
    return s, t, mask


def _loss_grad(fn, s, t, mask):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, t, mask)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


# --------------------------------------------------------------------------- relation: written-out grads


CASES = [((4, 12, 6), None), ((3, 2, 9, 4), None), ((4, 16, 24), None), ((3, 10, 5), 7), ((2, 3, 10, 8), 3),
         ((3, 40, 8), None)]


@pytest.mark.parametrize("kind", ["naive", "gram"])
@pytest.mark.parametrize("shape,dt", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_written_out_gradients_equal_autograd(kind, shape, dt, dtype):
    s, t, mask = _inputs(shape, dt, dtype)
    fast = rel.relation_mse_naive if kind == "naive" else rel.relation_mse_gram
    ref = rel.relation_mse_naive_reference if kind == "naive" else rel.relation_mse_gram_reference
    v1, g1 = _loss_grad(fast, s, t, mask)
    v2, g2 = _loss_grad(ref, s, t, mask)
    assert v1.dtype == dtype
    tol = dict(rtol=1e-10, atol=1e-13) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(v1, v2, **tol)
    torch.testing.assert_close(g1, g2, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, g2.abs().max().item()))
    pad = ~mask
    if s.dim() == 4:
        pad = pad[:, None, :].expand(*s.shape[:-1])
    assert g1[pad].abs().max() == 0  # padding gets an exact zero gradient


@pytest.mark.parametrize("nan_padding", [False, True])
def test_gram_lean_and_regular_paths_agree(nan_padding, monkeypatch):
    """The Gram form keeps only Δ for its backward when the students are viewable as [N, L, D]
    (contiguous heads) and S itself otherwise (transposed head views, bf16): same values, same
    gradients, exact zeros at padding even when the padding holds NaN."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3, 9, 2, 4, generator=gen)  # [B, L, heads, d]
    t = torch.randn(3, 2, 9, 4, generator=gen)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 1:] = False
    if nan_padding:
        base[0, 6] = float("nan")
    calls = []
    lean = rel._lean_gram_grad
    monkeypatch.setattr(rel, "_lean_gram_grad", lambda *a: calls.append(1) or lean(*a))
    results = []
    for contiguous in (True, False):
        leaf = base.clone().requires_grad_(True)
        s = leaf.transpose(1, 2)  # [B, heads, L, d]: a transposed view, or a contiguous copy of it
        loss = rel.relation_mse_gram(s.contiguous() if contiguous else s, t, mask)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
        assert len(calls) == 1  # the lean backward ran for the contiguous input only
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(g1).all() and g1[0, 5:].abs().max() == 0 and g1[2, 1:].abs().max() == 0
    clean = torch.where(mask[:, :, None, None], base, 0.0).transpose(1, 2)
    ref, ref_grad = _loss_grad(rel.relation_mse_gram_reference, clean, t, mask)
    torch.testing.assert_close(l1, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g1.transpose(1, 2), ref_grad, rtol=1e-4, atol=1e-6)


def test_gram_gradient_accurate_near_cancellation():
    """Student = teacher + 1e-3 noise: the written-out Gram gradient keeps its digits in fp32."""
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2, 256, 32, generator=gen, dtype=torch.float64)
    s = t + 1e-3 * torch.randn(2, 256, 32, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 256, dtype=torch.bool)
    mask[1, 200:] = False
    _, ref = _loss_grad(rel.relation_mse_naive_reference, s, t, mask)  # fp64 reference
    _, g32 = _loss_grad(rel.relation_mse_gram, s.float(), t.float(), mask)
    err = (g32.double() - ref).norm() / ref.norm()
    assert err < 1e-3, err


def test_low_precision_student_gets_gradient_in_its_dtype():
    s, t, mask = _inputs((3, 12, 8))
    for kind in ("naive", "gram"):
        fn = rel.relation_mse_naive if kind == "naive" else rel.relation_mse_gram
        sb = s.to(torch.bfloat16).requires_grad_(True)
        loss = fn(sb, t, mask)
        loss.backward()
        assert loss.dtype == torch.float32 and sb.grad.dtype == torch.bfloat16
        _, ref = _loss_grad(rel.relation_mse_naive_reference, sb.detach().float(), t, mask)
        torch.testing.assert_close(sb.grad.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_teacher_with_grad_falls_back_to_autograd():
    s, t, mask = _inputs((3, 12, 8))
    for fast, ref in ((rel.relation_mse_naive, rel.relation_mse_naive_reference),
                      (rel.relation_mse_gram, rel.relation_mse_gram_reference)):
        t1, t2 = t.clone().requires_grad_(True), t.clone().requires_grad_(True)
        fast(s, t1, mask).backward()
        ref(s, t2, mask).backward()
        torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- relation: batched pairs


def _pairs(seed=0):
    """T/I-like [B, L, H] pairs, A-like [B, heads, L, d] transposed views, and a mixed-dim pair."""
    gen = torch.Generator().manual_seed(seed)
    b, length, h, heads = 3, 10, 8, 2
    students, teachers = [], []
    for _ in range(4):
        students.append(torch.randn(b, length, h, generator=gen))
        teachers.append(torch.randn(b, length, h, generator=gen))
    for _ in range(3):
        students.append(torch.randn(b, length, h, generator=gen).unflatten(-1, (heads, -1)).transpose(1, 2))
        teachers.append(torch.randn(b, length, h, generator=gen).unflatten(-1, (heads, -1)).transpose(1, 2))
    students.append(torch.randn(b, length, 6, generator=gen))
    teachers.append(torch.randn(b, length, 12, generator=gen))
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 7:] = False
    mask[2, 2:] = False
    return students, teachers, mask


@pytest.mark.parametrize("form,impl", [("mse", "auto"), ("mse", "naive"), ("mse", "gram"), ("kl", "auto")])
@pytest.mark.parametrize("group_bytes", [None, 1])  # 1: every pair in its own chunk
def test_relation_losses_equal_one_call_per_pair(form, impl, group_bytes, monkeypatch):
    if group_bytes:
        monkeypatch.setattr(rel, "GROUP_BYTES", group_bytes)
    students, teachers, mask = _pairs()
    a = [x.detach().clone().requires_grad_(True) for x in students]
    b = [x.detach().clone().requires_grad_(True) for x in students]
    batched = rel.relation_losses(a, teachers, mask, form=form, tau=0.5, impl=impl)
    single = torch.stack([rel.relation_loss(s, t, mask, form=form, tau=0.5, impl=impl) for s, t in zip(b, teachers)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-7)
    w = torch.arange(1.0, len(a) + 1)
    (batched * w).sum().backward()
    (single * w).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)


def test_relation_losses_errors():
    s, t, mask = _inputs((2, 5, 4))
    with pytest.raises(ValueError, match="student tensors but"):
        rel.relation_losses([s], [], mask)
    with pytest.raises(ValueError, match="at least one pair"):
        rel.relation_losses([], [], mask)
    with pytest.raises(ValueError, match=r"mask must have shape \[B, L\]"):
        rel.relation_losses([s], [t], torch.ones(2, 4))


def test_objective_equals_per_pair_loop():
    """The batched objective gives the values and gradients of one relation_loss call per tap pair."""
    cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32,
                      max_position=32, hidden_dropout=0.0, attention_dropout=0.0, moe=MoEConfig(num_experts=4))
    tcfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=6, num_heads=2, intermediate_size=32,
                       max_position=32)
    torch.manual_seed(0)
    student, teacher = BertForMaskedLM(cfg).train(), BertForMaskedLM(tcfg).eval()
    ids = torch.randint(1, 50, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    ttaps = Taps(tap_points(teacher))
    with torch.no_grad(), ttaps:
        teacher(ids, mask)
    distill = DistillConfig(weight_t=2.0, weight_i=0.5, weight_a=1.5)
    objective = RelationObjective(distill, 3, 6)

    def run(batched: bool):
        student.zero_grad(set_to_none=True)
        taps = Taps(tap_points(student))
        with taps:
            student(ids, mask)
        if batched:
            total, terms = objective(taps.captured, ttaps.captured, mask)
        else:
            per = {p: [] for p in "TIA"}
            terms = {}
            for (p, layer, name), s in taps.captured.items():
                loss = rel.relation_loss(s, ttaps.captured[(p, objective.layer_map[layer], name)], mask)
                per[p].append(loss)
                terms[f"{p}/{layer}" + ("" if name == "out" else f"/{name}")] = loss.detach()
            total = sum(distill.weight(p) * torch.stack(v).mean() for p, v in per.items())
            terms.update({p: torch.stack(v).mean().detach() for p, v in per.items()})
        total.backward()
        taps.remove()
        return total.detach(), terms, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    t1, terms1, g1 = run(True)
    t2, terms2, g2 = run(False)
    torch.testing.assert_close(t1, t2, rtol=1e-5, atol=1e-7)
    assert set(terms1) == set(terms2)
    for k in terms1:
        torch.testing.assert_close(terms1[k], terms2[k], rtol=1e-5, atol=1e-7)
    assert set(g1) == set(g2)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- experts


def _moe(backend="torch", experts=6, top_k=1, cf=0.0, hidden=16, inter=32):
    cfg = ModelConfig(hidden_size=hidden, num_heads=1, intermediate_size=inter,
                      moe=MoEConfig(num_experts=experts, top_k=top_k, capacity_factor=cf, min_capacity=1,
                                    backend=backend))
    cfg.validate()
    layer = build_moe(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return layer


def _autograd_loop(experts, x, expert, counts):
    """The expert bank by plain autograd through the same loop (indexing and slicing)."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            h = F.gelu(torch.addmm(experts.b1[e], x[start:start + n], experts.w1[e]))
            outs.append(torch.addmm(experts.b2[e], h, experts.w2[e]))
            start += n
    return torch.cat(outs) if outs else x.new_zeros(0, experts.w2.shape[-1])


@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 7], [0, 0, 0, 0, 0, 16], [16, 0, 0, 0, 0, 0], [2, 3, 1, 4, 2, 4]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expert_loop_equals_autograd(counts, dtype):
    layer = _moe().to(dtype)
    experts = layer.experts
    counts = torch.tensor(counts)
    expert = torch.repeat_interleave(torch.arange(len(counts)), counts)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(int(counts.sum()), 16, generator=gen, dtype=dtype)
    g = torch.randn(int(counts.sum()), 16, generator=gen, dtype=dtype)
    results = []
    for fn in (experts, lambda *a: _autograd_loop(experts, *a)):
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = fn(xi, expert, counts)
        (y * g).sum().backward()
        grads = [xi.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in experts.parameters()]
        results.append((y.detach(), grads))
    (y1, g1), (y2, g2) = results
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y1, y2, **tol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **tol)


def test_expert_loop_respects_frozen_weights():
    layer = _moe()
    layer.experts.w1.requires_grad_(False)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y, stats = layer(x)
    y.sum().backward()
    assert layer.experts.w1.grad is None and layer.experts.w2.grad is not None and x.grad is not None


@pytest.mark.parametrize("top_k,cf", [(1, 0.0), (2, 0.0), (1, 1.0), (2, 1.5)])
def test_moe_layer_equals_per_token_definition(top_k, cf):
    """Sorted dispatch + expert loop + combine == for every token, sum over its kept choices of
    gate * expert(token): the definition, computed one token at a time."""
    from tcd_ds.model.routing import capacity, plan_dispatch

    layer = _moe(top_k=top_k, cf=cf).train()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(3))
    y, _ = layer(x)
    flat = x.reshape(-1, 16)
    with torch.no_grad():
        routing = layer.router(flat)
        plan = plan_dispatch(routing, 6, capacity(flat.shape[0], layer.cfg, True))
        kept = set(zip(plan.token.tolist(), plan.expert.tolist()))
        e = layer.experts
        want = torch.zeros_like(flat)
        for i in range(flat.shape[0]):
            for j in range(top_k):
                k = int(routing.expert[i, j])
                if (i, k) in kept:
                    h = F.gelu(flat[i] @ e.w1[k] + e.b1[k]) @ e.w2[k] + e.b2[k]
                    want[i] += routing.gate[i, j] * h
    torch.testing.assert_close(y.reshape(-1, 16), want, rtol=1e-5, atol=1e-5)


def test_grouped_equals_torch_with_empty_experts():
    ref, grp = _moe(experts=8), _moe("grouped", experts=8)
    grp.load_state_dict(ref.state_dict())
    with torch.no_grad():  # a router that sends nearly everything to experts 2 and 5
        ref.router.weight.zero_()
        ref.router.weight[2, 0] = ref.router.weight[5, 1] = 5.0
        grp.router.weight.copy_(ref.router.weight)
    x1 = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    (y1, s1), (y2, s2) = ref(x1), grp(x2)
    assert (s1.counts == 0).sum() >= 4  # most experts get no token
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    (y1.sum() + s1.loss).backward()
    (y2.sum() + s2.loss).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(ref.named_parameters(), grp.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)


# --------------------------------------------------------------------------- taps keep fused attention


def test_taps_do_not_force_unfused_attention(monkeypatch):
    """With every TCD position tapped, attention still runs through scaled_dot_product_attention
    (once per layer) and the A taps are views of the Q/K/V projections taken before it."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        calls.append((q, k, v))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(bert_module.F, "scaled_dot_product_attention", counting)
    cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_position=32,
                      moe=MoEConfig(num_experts=2))
    model = BertForMaskedLM(cfg).train()
    taps = Taps(tap_points(model, "TIA"))
    ids, mask = torch.randint(1, 50, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    with taps:
        model(ids, mask, labels=torch.where(torch.rand(2, 8) < 0.5, ids, -100))
    assert len(calls) == cfg.num_layers
    for layer, (q, k, v) in enumerate(calls, start=1):
        for name, x in zip("qkv", (q, k, v)):
            tap = taps.captured[("A", layer, name)]
            assert tap.shape == x.shape and torch.equal(tap, x)
            assert tap.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # a view: nothing copied
