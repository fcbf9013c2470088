"""Relation losses (tcd_ds.distill.relation) against plain float64 references."""
from __future__ import annotations

import math

import pytest
import torch

from tcd_ds.distill import relation as rel
from tcd_ds.distill.relation import (
    choose_impl,
    relation_kl,
    relation_loss,
    relation_matrix,
    relation_mse_gram,
    relation_mse_naive,
    uniform_layer_map,
)

MSE_IMPLS = {"naive": relation_mse_naive, "gram": relation_mse_gram}


# --------------------------------------------------------------------------- plain references


def _valid_seqs(x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per (sequence[, head]) the [n_valid, D] float64 token matrix, picked by index."""
    x = x.double()
    if x.dim() == 3:
        x = x[:, None]
    out = []
    for b in range(x.shape[0]):
        idx = [i for i in range(x.shape[2]) if bool(mask[b, i])]
        if not idx:
            continue
        for h in range(x.shape[1]):
            out.append(x[b, h, idx])
    return out


def _cos(x: torch.Tensor) -> torch.Tensor:
    u = x / x.norm(dim=-1, keepdim=True)
    return u @ u.T


def ref_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    losses = []
    for xs, xt in zip(_valid_seqs(s, mask), _valid_seqs(t, mask)):
        n = xs.shape[0]
        losses.append(((_cos(xs) - _cos(xt)) ** 2).sum() / n**2)
    return torch.stack(losses).mean()


def ref_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    losses = []
    for xs, xt in zip(_valid_seqs(s, mask), _valid_seqs(t, mask)):
        log_ps = torch.log_softmax(_cos(xs) / tau, dim=-1)
        log_pt = torch.log_softmax(_cos(xt) / tau, dim=-1)
        rows = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
        losses.append(rows.mean())
    return torch.stack(losses).mean()


# --------------------------------------------------------------------------- inputs

# (B, H or None, L, Ds, Dt, mask style, seed)
CASES = [
    (3, None, 7, 5, 5, "prefix", 0),
    (4, None, 12, 6, 9, "random", 1),  # Ds != Dt
    (3, 2, 9, 4, 4, "prefix", 2),  # 4-D (per-head)
    (2, 3, 10, 8, 3, "random", 3),  # 4-D, Ds != Dt
    (5, None, 16, 24, 24, "random", 4),  # D > L
]


def make_mask(b: int, length: int, style: str, gen: torch.Generator) -> torch.Tensor:
    """Variable padding; sequence 0 always has exactly one valid token, sequence 1 is full."""
    if style == "prefix":
        n = torch.randint(1, length + 1, (b,), generator=gen)
        n[0], n[1] = 1, length
        return torch.arange(length)[None, :] < n[:, None]
    mask = torch.rand(b, length, generator=gen) < 0.6
    mask[0] = False
    mask[0, length // 2] = True
    mask[1] = True
    return mask


def make_case(case, dtype=torch.float32):
    b, h, length, ds, dt, style, seed = case
    gen = torch.Generator().manual_seed(seed)
    lead = (b, length) if h is None else (b, h, length)
    s = torch.randn(*lead, ds, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.randn(*lead, dt, generator=gen, dtype=torch.float64).to(dtype)
    mask = make_mask(b, length, style, gen)
    return s, t, mask


def loss_and_grad(fn, s, t, mask, **kw):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, t, mask, **kw)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


# --------------------------------------------------------------------------- MSE vs reference


@pytest.mark.parametrize("impl", ["naive", "gram"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}L{c[2]}Ds{c[3]}Dt{c[4]}{c[5]}")
def test_mse_matches_float64_reference(case, impl):
    s, t, mask = make_case(case, torch.float64)
    ref, ref_grad = loss_and_grad(ref_mse, s, t, mask)
    assert ref > 1e-3  # non-trivial

    # float64 implementation: tight
    val, grad = loss_and_grad(MSE_IMPLS[impl], s, t, mask)
    assert val.dtype == torch.float64
    torch.testing.assert_close(val, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)

    # fp32 implementation: fp32 tolerances
    val32, grad32 = loss_and_grad(MSE_IMPLS[impl], s.float(), t.float(), mask)
    assert val32.dtype == torch.float32
    torch.testing.assert_close(val32.double(), ref, rtol=1e-5, atol=1e-7)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad32.double(), ref_grad, rtol=1e-4, atol=1e-5 * scale)


def test_relation_matrix_is_masked_cosine():
    s, _, mask = make_case(CASES[2], torch.float64)  # [B, H, L, D]
    r = relation_matrix(s, mask)
    assert r.shape == (*s.shape[:-1], s.shape[-2])
    for b in range(s.shape[0]):
        idx = mask[b].nonzero().flatten()
        pad = (~mask[b]).nonzero().flatten()
        for h in range(s.shape[1]):
            torch.testing.assert_close(r[b, h][idx][:, idx], _cos(s[b, h, idx]))
            assert not r[b, h][pad].any() and not r[b, h][:, pad].any()


def test_gram_near_cancellation_fp32():
    """Student = teacher + 1e-3 relative noise at L=512, D=64: fp32 must keep its digits."""
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2, 512, 64, generator=gen)
    s = t + 1e-3 * t.norm(dim=-1, keepdim=True) / 8 * torch.randn(2, 512, 64, generator=gen)
    mask = torch.ones(2, 512, dtype=torch.bool)
    mask[1, 400:] = False
    ref = ref_mse(s, t, mask).item()
    assert 1e-10 < ref < 1e-6
    gram = relation_mse_gram(s, t, mask).item()
    naive = relation_mse_naive(s, t, mask).item()
    assert abs(gram - ref) / ref < 1e-4  # ~3e-7 measured; the textbook expansion gives ~1e-2
    assert abs(naive - ref) / ref < 1e-5


@pytest.mark.parametrize("noise,tol", [(1e-4, 1e-3), (1e-5, 1e-3), (1e-6, 0.1)])
def test_auto_is_accurate_near_convergence_with_unequal_widths(noise, tol):
    """L=512, teacher width 32, student width 64, the student an isometric image of the teacher plus
    noise (so its relations nearly equal the teacher's): fp32 `auto` against float64 on the same inputs.
    (The Gram form, the old `auto` choice here, came out negative: -1.9e-9 for a true 6.4e-10.)"""
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2, 512, 32, generator=gen, dtype=torch.float64)
    iso = torch.linalg.qr(torch.randn(64, 32, generator=gen, dtype=torch.float64))[0].T  # orthonormal rows
    s = t @ iso + noise * torch.randn(2, 512, 64, generator=gen, dtype=torch.float64)
    s, t = s.float(), t.float()
    mask = torch.ones(2, 512, dtype=torch.bool)
    mask[1, 400:] = False
    ref = ref_mse(s, t, mask).item()  # float64 from the fp32 inputs
    assert 1e-15 < ref < 1e-8
    for got in (relation_loss(s, t, mask), rel.relation_losses([s], [t], mask)[0]):
        assert abs(got.item() - ref) / ref < tol, (got.item(), ref)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("form,impl", [("mse", "naive"), ("mse", "gram"), ("kl", "naive")])
def test_identical_inputs_give_zero(form, impl):
    s, _, mask = make_case(CASES[2])
    loss = relation_loss(s, s.clone(), mask, form=form, impl=impl)
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("form,impl", [("mse", "naive"), ("mse", "gram"), ("kl", "naive")])
def test_invariant_to_positive_token_scaling(form, impl):
    s, t, mask = make_case(CASES[1])
    gen = torch.Generator().manual_seed(7)
    scale_s = torch.rand(*s.shape[:-1], 1, generator=gen) * 10 + 0.1
    scale_t = torch.rand(*t.shape[:-1], 1, generator=gen) * 10 + 0.1
    a = relation_loss(s, t, mask, form=form, impl=impl)
    b = relation_loss(s * scale_s, t * scale_t, mask, form=form, impl=impl)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("form,impl", [("mse", "naive"), ("mse", "gram"), ("kl", "naive")])
def test_padding_content_is_ignored(form, impl):
    s, t, mask = make_case(CASES[3])  # 4-D, random mask
    pad = ~mask[:, None, :, None].expand_as(s)
    s2, t2 = s.clone(), t.clone()
    s2[pad] = torch.randn(int(pad.sum())) * 1e3
    t2[~mask[:, None, :, None].expand_as(t)] = float("inf")
    la, ga = loss_and_grad(relation_loss, s, t, mask, form=form, impl=impl)
    lb, gb = loss_and_grad(relation_loss, s2, t2, mask, form=form, impl=impl)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
    assert gb[pad].abs().max() == 0
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("form,impl", [("mse", "naive"), ("mse", "gram"), ("kl", "naive")])
def test_empty_sequences(form, impl):
    s, t, mask = make_case(CASES[0], torch.float64)
    mask[2] = False  # one empty sequence: excluded from the mean
    ref = ref_mse(s, t, mask) if form == "mse" else ref_kl(s, t, mask, 1.0)
    val = relation_loss(s, t, mask, form=form, impl=impl)
    torch.testing.assert_close(val, ref, rtol=1e-10, atol=1e-12)

    s32 = s.float().requires_grad_(True)
    zero = relation_loss(s32, t.float(), torch.zeros_like(mask), form=form, impl=impl)
    assert zero.item() == 0.0 and zero.dtype == torch.float32
    zero.backward()  # grad path exists
    assert torch.equal(s32.grad, torch.zeros_like(s32))


@pytest.mark.parametrize("impl", ["naive", "gram"])
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_low_precision_inputs_computed_in_fp32(impl, low, which):
    s, t, mask = make_case(CASES[1])
    if which == "teacher":
        t = t.to(low)
    else:
        s = s.to(low)
    val = relation_loss(s, t, mask, impl=impl)
    assert val.dtype == torch.float32
    torch.testing.assert_close(val.double(), ref_mse(s, t, mask), rtol=1e-5, atol=1e-7)
    mask01 = mask.to(torch.int64)  # 0/1 masks behave like bool masks
    torch.testing.assert_close(relation_loss(s, t, mask01, impl=impl), val)


def test_autocast_does_not_lower_precision():
    s, t, mask = make_case(CASES[0])
    plain = relation_loss(s, t, mask, impl="gram")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = relation_loss(s, t, mask, impl="gram")
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- KL


@pytest.mark.parametrize("tau", [1.0, 0.3])
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"B{c[0]}H{c[1]}L{c[2]}Ds{c[3]}Dt{c[4]}{c[5]}")
def test_kl_matches_float64_reference(case, tau):
    s, t, mask = make_case(case, torch.float64)
    ref, ref_grad = loss_and_grad(ref_kl, s, t, mask, tau=tau)
    assert ref > 1e-4
    val, grad = loss_and_grad(relation_kl, s, t, mask, tau=tau)
    torch.testing.assert_close(val, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    val32, grad32 = loss_and_grad(relation_loss, s.float(), t.float(), mask, form="kl", tau=tau)
    torch.testing.assert_close(val32.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad32.double(), ref_grad, rtol=1e-4, atol=1e-5 * ref_grad.abs().max().item())


# --------------------------------------------------------------------------- impl choice and errors


def test_choose_impl():
    assert choose_impl("mse", 64, 64, 512) == "gram"
    assert choose_impl("mse", 64, 768, 512) == "naive"  # unequal widths
    assert choose_impl("mse", 32, 64, 512) == "naive"  # unequal widths, both < L: Gram would cancel (below)
    assert choose_impl("mse", 512, 512, 512) == "naive"  # strict: D < L
    assert choose_impl("mse", 64, 64, 512, "naive") == "naive"
    assert choose_impl("mse", 768, 768, 128, "gram") == "gram"
    assert choose_impl("kl", 8, 8, 512) == "naive"


def test_auto_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(rel, "relation_mse_gram", lambda s, t, m: calls.append("gram") or s.sum())
    monkeypatch.setattr(rel, "relation_mse_naive", lambda s, t, m: calls.append("naive") or s.sum())
    mask = torch.ones(2, 16, dtype=torch.bool)
    relation_loss(torch.randn(2, 16, 8), torch.randn(2, 16, 8), mask)  # D < L
    relation_loss(torch.randn(2, 16, 16), torch.randn(2, 16, 16), mask)  # D == L
    relation_loss(torch.randn(2, 16, 8), torch.randn(2, 16, 32), mask)  # Dt > L
    relation_loss(torch.randn(2, 3, 16, 4), torch.randn(2, 3, 16, 4), mask)  # 4-D, D < L
    relation_loss(torch.randn(2, 16, 64), torch.randn(2, 16, 64), mask, impl="gram")
    assert calls == ["gram", "naive", "naive", "gram", "gram"]


def test_errors():
    s, t, mask = torch.randn(2, 5, 4), torch.randn(2, 5, 6), torch.ones(2, 5)
    with pytest.raises(ValueError, match="unknown relation form"):
        relation_loss(s, t, mask, form="l2")
    with pytest.raises(ValueError, match="unknown relation impl"):
        relation_loss(s, t, mask, impl="fast")
    with pytest.raises(ValueError, match="only available for form='mse'"):
        relation_loss(s, t, mask, form="kl", impl="gram")
    with pytest.raises(ValueError, match="agree on batch/head/seq"):
        relation_loss(s, torch.randn(2, 6, 4), mask)
    with pytest.raises(ValueError, match="agree on batch/head/seq"):
        relation_loss(s, torch.randn(3, 5, 4), mask)
    with pytest.raises(ValueError, match="agree on batch/head/seq"):
        relation_loss(torch.randn(2, 3, 5, 4), torch.randn(2, 2, 5, 4), mask)
    with pytest.raises(ValueError, match="agree on batch/head/seq"):
        relation_loss(torch.randn(2, 3, 5, 4), s, mask)
    with pytest.raises(ValueError, match=r"mask must have shape \[B, L\]"):
        relation_loss(s, t, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"mask must have shape \[B, L\]"):
        relation_mse_gram(s, t, torch.ones(2, 1, 5))
    with pytest.raises(ValueError, match=r"\[B, L, D\] or \[B, H, L, D\]"):
        relation_loss(torch.randn(5, 4), torch.randn(5, 4), mask)
    with pytest.raises(ValueError, match="tau must be > 0"):
        relation_loss(s, t, mask, form="kl", tau=0.0)


# --------------------------------------------------------------------------- layer map


@pytest.mark.parametrize(
    "n_student,n_teacher,expected",
    [
        (4, 12, [2, 5, 8, 11]),
        (12, 12, list(range(12))),
        (6, 12, [1, 3, 5, 7, 9, 11]),
        (12, 6, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]),
        (5, 12, [1, 4, 6, 9, 11]),  # 2.4, 4.8, 7.2, 9.6, 12 rounded (1-based)
        (3, 1, [0, 0, 0]),
        (1, 12, [11]),
    ],
)
def test_uniform_layer_map(n_student, n_teacher, expected):
    got = uniform_layer_map(n_student, n_teacher)
    assert got == expected
    assert got[-1] == n_teacher - 1 and got == sorted(got)


@pytest.mark.parametrize("ns,nt", [(0, 12), (4, 0), (-1, 3)])
def test_uniform_layer_map_errors(ns, nt):
    with pytest.raises(ValueError, match="layer counts must be >= 1"):
        uniform_layer_map(ns, nt)


def test_uniform_layer_map_matches_rounding_formula():
    for ns in range(1, 25):
        for nt in range(1, 25):
            want = [max(1, math.floor(i * nt / ns + 0.5)) - 1 for i in range(1, ns + 1)]
            assert uniform_layer_map(ns, nt) == want


# --------------------------------------------------------------------------- benchmark smoke test


@pytest.mark.slow
@pytest.mark.multiproc
def test_bench_quick_rows_well_formed():
    from tcd_ds.bench import relation as bench

    machine: dict = {}
    rows = bench.run(quick=True, machine=machine)
    assert len(rows) == len(bench._specs(quick=True)) > 0
    for key in ("platform", "cpu_count", "torch", "torch_threads"):
        assert key in machine
    for r in rows:
        assert set(bench.ROW_KEYS) <= set(r)
        assert r["variant"] in bench.VARIANTS and r["impl"] in ("naive", "gram")
        assert r["median_ms"] > 0 and r["min_ms"] > 0 and r["repeats"] >= 1
        assert r["peak_mib"] >= 0 and isinstance(r["mem_method"], str)
        assert math.isfinite(r["loss"])
    # the three variants of one case compute the same loss
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["seq_len"], r["dim"]), []).append(r["loss"])
    for losses in by_case.values():
        assert max(losses) - min(losses) <= 1e-5 * max(abs(x) for x in losses)
    assert "| L | dim |" in bench.format_table(rows)
