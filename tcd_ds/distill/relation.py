"""Token-relation losses for Transfer Capability Distillation (TCD).

A *relation* of one token set ``X`` (one sequence, or one sequence of one head
for the attention position) is its cosine-similarity matrix over the
non-padding tokens::

    R(X)_ij = cos(x_i, x_j)        i, j valid tokens

The student's relations are pulled towards the (frozen) teacher's. Two forms (registered by name in
``tcd_ds/distill/forms.py``, where a new one is added):

* ``"mse"``: per sequence ``b``, ``sum_{valid i,j} (R_s - R_t)_ij^2 / n_b^2``
  (``n_b`` = number of valid tokens), then the mean over sequences.
* ``"kl"``: per valid row ``i``,
  ``KL(softmax(R_t[i, :] / tau) || softmax(R_s[i, :] / tau))`` with the softmax
  over valid columns only; mean over valid rows, then mean over sequences.

Sequences with no valid token are left out of the mean over sequences; if every
sequence is empty the loss is an exact 0 that still has a grad path.

Inputs are ``[B, L, D]`` or ``[B, H, L, D]`` with a ``[B, L]`` mask (bool or
0/1, true = real token). Student and teacher may differ in feature dim and in
dtype: both are upcast and the loss is computed in fp32 (fp64 if either input is
fp64), with autocast disabled, and returned as a scalar of that dtype.

Implementations of the MSE form:

* naive: builds the ``L x L`` matrices (O(L^2 D) time, O(L^2) memory).
* Gram: with rows L2-normalised and padding rows zeroed (``S``, ``T``),
  ``||S S^T - T T^T||_F^2`` needs only ``D x D`` products, no ``L x L``.
  When ``Ds == Dt`` it uses the rearrangement, with ``Δ = S - T``,
  ``Σ = S + T`` (so ``S S^T - T T^T = (Δ Σ^T + Σ Δ^T) / 2``)::

      ||S S^T - T T^T||_F^2 = ( <Δ^T Δ, Σ^T Σ> + <Δ^T Σ, (Δ^T Σ)^T> ) / 2

  whose terms are O(|Δ|^2), so it stays accurate when the student is close to
  the teacher (the regime distillation drives towards). The textbook expansion
  ``||S^T S||^2 - 2 ||S^T T||^2 + ||T^T T||^2`` subtracts O(n^2) terms to get
  an O(|Δ|^2) result and loses several digits in fp32 there (about 1e-2
  relative error measured at L=512, D=64, 1e-3 relative noise, against ~1e-7
  for the rearranged form); it is only used when ``Ds != Dt``, where ``Δ`` is
  undefined, and only when asked for (``impl="gram"``): there it loses all digits
  near convergence (measured at L=512, Dt=32, Ds=64, student an isometric image of
  the teacher plus noise: a true loss of 6.4e-10 comes out as -1.9e-9), so
  ``impl="auto"`` picks naive whenever the widths differ (1.7e-5 relative error
  there, in fp32).

Both MSE implementations run in one ``torch.autograd.Function`` with the normalisation and the
gradient written out (``d/dS ||S S^T - T T^T||^2 = 4 (S S^T - T T^T) S``, then through the row
normalisation), which costs fewer batched matmuls and elementwise passes than autograd through the
same ops: naive 2 forward + 1 backward ``L x L x D`` products (autograd: 2 + 2), Gram 3 forward +
2 backward ``D x D x L`` products (autograd: 3 + 6); the teacher gets no gradient (a teacher that
requires grad goes through autograd). The backward of the Gram form uses the same ``Δ``/``Σ``
rearrangement, so it is accurate near cancellation too::

    (S S^T - T T^T) S = ( Δ (Σ^T Σ + Σ^T Δ) + Σ (Δ^T Σ + Δ^T Δ) ) / 4

The plain autograd versions are kept as ``relation_mse_naive_reference`` /
``relation_mse_gram_reference`` (tested equal in tests/test_fast_paths.py; the ``*_autograd`` rows
of ``python -m tcd_ds.bench --only relation``).

:func:`relation_losses` computes many pairs at once: pairs of the same shapes and dtypes are
stacked into one batch (one call per group instead of one per pair), with the same value per pair
as :func:`relation_loss`.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from tcd_ds.distill import forms

__all__ = [
    "relation_loss",
    "relation_mse_naive",
    "relation_mse_gram",
    "relation_kl",
    "relation_matrix",
    "relation_losses",
    "relation_mse_naive_reference",
    "relation_mse_gram_reference",
    "choose_impl",
    "uniform_layer_map",
]

IMPLS = forms.IMPLS
EPS = 1e-8  # norm floor when L2-normalising token vectors (as F.normalize)


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    """Run the enclosed ops at the dtype we chose, even inside an autocast region."""
    try:
        ctx = torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # device type without autocast support
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def _check_pair(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise ValueError (one line) unless s, t, mask have compatible shapes."""
    if s.dim() not in (3, 4):
        raise ValueError(f"student must be [B, L, D] or [B, H, L, D], got shape {tuple(s.shape)}")
    if t.dim() != s.dim() or t.shape[:-1] != s.shape[:-1]:
        raise ValueError(
            f"student and teacher must agree on batch/head/seq dims: {tuple(s.shape)} vs {tuple(t.shape)}"
        )
    _check_mask(s, mask)


def _check_mask(x: torch.Tensor, mask: torch.Tensor) -> None:
    if x.dim() not in (3, 4):
        raise ValueError(f"input must be [B, L, D] or [B, H, L, D], got shape {tuple(x.shape)}")
    expected = (x.shape[0], x.shape[-2])
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must have shape [B, L] = {list(expected)}, got {list(mask.shape)}")


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 if any input is fp64."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _flat(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, D] / [B, H, L, D] -> ([N, L, D], bool mask [N, L]) with N = B or B*H."""
    m = mask.to(device=x.device, dtype=torch.bool)
    if x.dim() == 4:
        b, h, l, d = x.shape
        m = m[:, None, :].expand(b, h, l).reshape(b * h, l)
        x = x.reshape(b * h, l, d)
    return x, m


def _unit_rows(x: torch.Tensor, m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """L2-normalise token vectors in ``dtype``; padding rows are exactly zero.

    Padding is zeroed *before* normalising (with ``where``), so whatever sits at
    padded positions (even inf/nan) neither reaches the loss nor gets a gradient.
    """
    x = torch.where(m[..., None], x.to(dtype), 0.0)
    return F.normalize(x, dim=-1, eps=EPS)


def _prepare(
    s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate, flatten heads into the batch, upcast and normalise.

    Returns unit-row student ``[N, L, Ds]``, teacher ``[N, L, Dt]`` and bool mask ``[N, L]``.
    """
    _check_pair(s, t, mask)
    dtype = _compute_dtype(s, t)
    s, m = _flat(s, mask)
    t, _ = _flat(t, mask)
    return _unit_rows(s, m, dtype), _unit_rows(t, m, dtype), m


def _mean_over_sequences(per_seq: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Mean of per-sequence losses over sequences with at least one valid token.

    Empty sequences contribute an exact 0 and are not counted; with no non-empty
    sequence the result is 0 (still connected to the graph, no NaN).
    """
    nonempty = (n > 0).to(per_seq.dtype)
    return (per_seq * nonempty).sum() / nonempty.sum().clamp(min=1.0)


def _sq_frob(x: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm over the last two dims."""
    return x.square().sum(dim=(-2, -1))


# --------------------------------------------------------------------------- public API


def relation_matrix(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cosine-similarity matrix of the tokens of each sequence (and head).

    Args:
        x: ``[B, L, D]`` or ``[B, H, L, D]``.
        mask: ``[B, L]``, true/1 = real token.

    Returns:
        ``[B, L, L]`` or ``[B, H, L, L]`` in fp32 (fp64 for fp64 input); rows and
        columns of padding tokens are zero.
    """
    _check_mask(x, mask)
    with _no_autocast(x.device):
        xf, m = _flat(x, mask)
        u = _unit_rows(xf, m, _compute_dtype(x))
        r = u @ u.mT
    return r.reshape(*x.shape[:-1], x.shape[-2])


def _stack_unit_rows(xs: Sequence[torch.Tensor], mask: torch.Tensor, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K same-shape ``[B, (H,) L, D]`` tensors as one fresh ``[K*N, L, D]`` buffer of unit rows in
    ``dtype`` (no autograd); padding rows are exactly zero, as with :func:`_unit_rows`.

    Each row is divided by its norm straight into the buffer (upcast, stacking and normalising in
    one pass); padding rows are then zeroed, so whatever they held (even inf/nan) is dropped.
    Returns (unit rows, norms clamped at EPS ``[K*N, L, 1]`` (1 at padding), norm > EPS).
    """
    x0 = xs[0]
    shape = x0.shape
    buf = torch.empty((len(xs), *shape), dtype=dtype, device=x0.device)
    norm = torch.empty((len(xs), *shape[:-1], 1), dtype=dtype, device=x0.device)
    for i, x in enumerate(xs):
        torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype, out=norm[i])
    big = norm > EPS
    clamped = norm.clamp_min_(EPS)
    for i, x in enumerate(xs):
        torch.div(x, clamped[i], out=buf[i])
    m = mask.to(device=x0.device, dtype=torch.bool)
    if not bool(m.all()):
        keep = m[:, None, :, None] if x0.dim() == 4 else m[:, :, None]  # broadcast over K (and heads)
        buf.masked_fill_(~keep, 0.0)
        clamped.masked_fill_(~keep, 1.0)
        big &= keep
    flat = (-1, *shape[-2:])
    return buf.view(flat), clamped.view(-1, shape[-2], 1), big.view(-1, shape[-2], 1)


def _sq_products(su: torch.Tensor, tu: torch.Tensor, kind: str):
    """``||S S^T - T T^T||_F^2`` per sequence (no autograd) and what its gradient needs."""
    if kind == "naive":
        diff = (tu @ tu.mT).baddbmm_(su, su.mT, beta=-1.0)  # S S^T - T T^T, [N, L, L], symmetric
        return torch.linalg.vector_norm(diff, dim=(-2, -1)).square(), (diff,)
    if su.shape[-1] == tu.shape[-1]:
        delta, total = su - tu, su + tu
        dd = delta.mT @ delta  # [N, D, D]
        tt = total.mT @ total
        dt = delta.mT @ total
        sq = 0.5 * (torch.linalg.vecdot(dd.flatten(1), tt.flatten(1))
                    + torch.linalg.vecdot(dt.flatten(1), dt.mT.flatten(1)))
        return sq, (delta, total, dd, tt, dt)
    ss, st, tt = su.mT @ su, su.mT @ tu, tu.mT @ tu
    return _sq_frob(ss) - 2.0 * _sq_frob(st) + _sq_frob(tt), (tu, ss, st)


def _sq_grad(su: torch.Tensor, saved: tuple, kind: str) -> tuple[torch.Tensor, float]:
    """``(G, c)`` with ``c * G = 4 (S S^T - T T^T) S``, the gradient of :func:`_sq_products`."""
    if kind == "naive":
        (diff,) = saved
        return diff @ su, 4.0
    if len(saved) == 5:
        delta, total, dd, tt, dt = saved
        # 4 (S S^T - T T^T) S = Δ (Σ^T Σ + Σ^T Δ) + Σ (Δ^T Σ + Δ^T Δ)   (every term O(Δ))
        return (delta @ (tt + dt.mT)).baddbmm_(total, dt + dd), 1.0
    tu, ss, st = saved
    return (su @ ss).baddbmm_(tu, st.mT, alpha=-1.0), 4.0  # 4 (S S^T S - T T^T S)


class _RelationSq(torch.autograd.Function):
    """``||R(s_i) - R(t_i)||_F^2`` per sequence for K same-shape pairs at once, ``[K*N]``, with R the
    masked cosine matrix; the gradient goes to the students only.

    ``apply(mask, kind, K, s_1..s_K, t_1..t_K)``. Stacking, upcast, normalisation, the products
    and their gradients are written out (see module doc). The Gram form with ``Ds == Dt`` keeps only
    ``Δ`` (and ``D x D`` matrices) for the backward: ``S`` is folded back in from the inputs
    themselves, which autograd keeps anyway, so its peak memory is about two ``[N, L, D]`` buffers.
    """

    @staticmethod
    def forward(ctx, mask: torch.Tensor, kind: str, k: int, *xs: torch.Tensor) -> torch.Tensor:
        students, teachers = xs[:k], xs[k:]
        dtype = _compute_dtype(students[0], teachers[0])
        need_grad = any(ctx.needs_input_grad[3:3 + k])
        if kind == "gram" and students[0].shape[-1] == teachers[0].shape[-1] and all(
                x.dtype == dtype and _flat_view(x) is not None for x in students):
            tu = _stack_unit_rows(teachers, mask, dtype)[0]
            su, norm, big = _stack_unit_rows(students, mask, dtype)
            delta = torch.sub(su, tu, out=tu)  # Δ = S - T, exact where S ~ T; in T's buffer
            neg_total = torch.sub(delta, su, alpha=2.0, out=su)  # -Σ = Δ - 2 S = -(S + T), in S's buffer
            dd, tt, ndt = delta.mT @ delta, neg_total.mT @ neg_total, delta.mT @ neg_total  # ndt = -Δ^T Σ
            sq = 0.5 * ((dd * tt).sum(dim=(-2, -1)) + (ndt * ndt.mT).sum(dim=(-2, -1)))
            del neg_total, su
            if need_grad:
                ctx.lean = True
                ctx.save_for_backward(norm, big, delta, dd, tt, ndt, mask, *students)
        else:
            su, norm, big = _stack_unit_rows(students, mask, dtype)
            tu = _stack_unit_rows(teachers, mask, dtype)[0]
            sq, saved = _sq_products(su, tu, kind)
            if need_grad:
                ctx.lean = False
                ctx.save_for_backward(su, norm, big, *saved)
        if need_grad:
            ctx.kind, ctx.shape, ctx.in_dtypes = kind, students[0].shape, [x.dtype for x in students]
        return sq

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        k = len(ctx.in_dtypes)
        if ctx.lean:
            g = _lean_gram_grad(ctx.saved_tensors, k, grad)
        else:
            su, norm, big, *saved = ctx.saved_tensors
            g, c = _sq_grad(su, tuple(saved), ctx.kind)
            # through u = x / max(|x|, eps): (g - u (u . g) [|x| > eps]) / max(|x|, eps), times the
            # incoming per-sequence gradient. Padding rows of u and g are exactly 0 (and their norm is
            # 1), so padding gets an exact 0 gradient.
            dot = torch.einsum("nld,nld->nl", g, su).unsqueeze(-1).mul_(big)
            g.addcmul_(su, dot, value=-1.0).mul_((c * grad)[:, None, None] / norm)
        grads = g.view(k, *ctx.shape).unbind(0)
        return (None, None, None, *(gi.to(dt) for gi, dt in zip(grads, ctx.in_dtypes)), *([None] * k))


def _flat_view(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as ``[N, L, D]`` without a copy, or None when that needs one."""
    try:
        return x.view(-1, *x.shape[-2:])
    except RuntimeError:
        return None


def _lean_gram_grad(saved: tuple, k: int, grad: torch.Tensor) -> torch.Tensor:
    """The Gram backward of :class:`_RelationSq` from Δ and the raw inputs ``x`` (``S = r x``, r the
    inverse clamped row norms), without materialising ``S``.

    With ``M1 = Σ^T Σ + Σ^T Δ`` and ``M2 = Δ^T Σ + Δ^T Δ``, ``4 (S S^T - T T^T) S = Δ M1 + Σ M2
    = Δ (M1 - M2) + 2 S M2`` (every term O(Δ)). Writing ``q = Δ (M1 - M2) / r + 2 x M2`` (so the
    gradient with respect to S is ``r q``), the gradient with respect to x is
    ``c r^2 (q - r^2 x (x . q) [|x| > eps])`` with c the incoming per-sequence gradient.
    """
    norm, big, delta, dd, tt, ndt, mask, *students = saved  # ndt = -Δ^T Σ
    m1_minus_m2 = (tt - dd).sub_(ndt.mT).add_(ndt)  # Σ^T Σ + Σ^T Δ - Δ^T Σ - Δ^T Δ
    g = (delta @ m1_minus_m2).mul_(norm)  # Δ (M1 - M2) / r
    m2 = torch.sub(dd, ndt).mul_(2.0)  # 2 (Δ^T Σ + Δ^T Δ)
    n = delta.shape[0] // k
    r2 = norm.reciprocal().square_()  # [K*N, L, 1]
    for i, x in enumerate(students):
        rows = slice(i * n, (i + 1) * n)
        xi = x.view(n, *x.shape[-2:])  # the input itself (checked in forward)
        gi = g[rows]
        gi.baddbmm_(xi, m2[rows])  # q
        dot = torch.einsum("nld,nld->nl", gi, xi).unsqueeze(-1).mul_(r2[rows]).mul_(big[rows])
        gi.addcmul_(xi, dot, value=-1.0)
    g.mul_(r2.mul_(grad[:, None, None]))
    m = mask.to(dtype=torch.bool)
    if not bool(m.all()):  # padding rows hold whatever x held there: exactly 0 instead
        keep = m[:, None, :, None] if students[0].dim() == 4 else m[:, :, None]
        g.view(k, *students[0].shape).masked_fill_(~keep, 0.0)
    return g


def _sq_autograd(su: torch.Tensor, tu: torch.Tensor, kind: str) -> torch.Tensor:
    """The same squared norms as :class:`_RelationSq` from unit rows, by autograd (the reference)."""
    if kind == "naive":
        return _sq_frob(su @ su.mT - tu @ tu.mT)  # padding rows/cols are 0 in both
    if su.shape[-1] == tu.shape[-1]:
        delta, total = su - tu, su + tu
        dd = delta.mT @ delta  # [N, D, D]
        tt = total.mT @ total
        dt = delta.mT @ total
        return 0.5 * ((dd * tt).sum(dim=(-2, -1)) + (dt * dt.mT).sum(dim=(-2, -1)))
    return _sq_frob(su.mT @ su) - 2.0 * _sq_frob(su.mT @ tu) + _sq_frob(tu.mT @ tu)


def _valid_counts(x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Valid tokens per flattened sequence, ``[N]`` (N = B, or B*H with heads)."""
    n = mask.to(device=x.device, dtype=torch.bool).sum(-1).to(dtype)
    return n.repeat_interleave(x.shape[1]) if x.dim() == 4 else n


def _mse_losses(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], mask: torch.Tensor,
                kind: str) -> torch.Tensor:
    """MSE relation loss of K same-shape pairs, ``[K]`` (inputs already checked).

    The written-out gradient covers the students only; a teacher that requires grad (not TCD's)
    goes through autograd instead, so it gets its gradient too.
    """
    k = len(students)
    dtype = _compute_dtype(students[0], teachers[0])
    n = _valid_counts(students[0], mask, dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in teachers):
        s = torch.cat([_flat(x, mask)[0] for x in students])
        t = torch.cat([_flat(x, mask)[0] for x in teachers])
        m = _flat(students[0], mask)[1].repeat(k, 1)
        sq = _sq_autograd(_unit_rows(s, m, dtype), _unit_rows(t, m, dtype), kind)
    else:
        sq = _RelationSq.apply(mask, kind, k, *students, *teachers)
    per_seq = sq.view(k, -1) / n.square().clamp(min=1.0)
    nonempty = (n > 0).to(per_seq.dtype)
    return (per_seq * nonempty).sum(-1) / nonempty.sum().clamp(min=1.0)


def relation_mse_naive(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE relation loss via explicit ``L x L`` cosine matrices (see module doc)."""
    _check_pair(s, t, mask)
    with _no_autocast(s.device):
        return _mse_losses([s], [t], mask, "naive")[0]


def relation_mse_gram(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE relation loss from feature-dim Gram matrices only (no ``L x L``).

    Same value as :func:`relation_mse_naive`; cost O(L D^2) time and O(D^2)
    extra memory per sequence. Uses the cancellation-free form when ``Ds == Dt``
    (see module doc).
    """
    _check_pair(s, t, mask)
    with _no_autocast(s.device):
        return _mse_losses([s], [t], mask, "gram")[0]


def _reference(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    with _no_autocast(s.device):
        su, tu, m = _prepare(s, t, mask)
        n = m.sum(-1).to(su.dtype)
        return _mean_over_sequences(_sq_autograd(su, tu, kind) / n.square().clamp(min=1.0), n)


def relation_mse_naive_reference(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`relation_mse_naive` by autograd through the products (what the fast path is tested against)."""
    return _reference(s, t, mask, "naive")


def relation_mse_gram_reference(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`relation_mse_gram` by autograd through the products (what the fast path is tested against)."""
    return _reference(s, t, mask, "gram")


def _kl_per_seq(su: torch.Tensor, tu: torch.Tensor, m: torch.Tensor, tau: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    n = m.sum(-1).to(su.dtype)
    cols = m[:, None, :]  # [N, 1, L]
    neg = torch.finfo(su.dtype).min  # finite, so empty rows stay NaN-free
    logp_s = ((su @ su.mT) / tau).masked_fill(~cols, neg).log_softmax(dim=-1)
    logp_t = ((tu @ tu.mT) / tau).masked_fill(~cols, neg).log_softmax(dim=-1)
    terms = logp_t.exp() * (logp_t - logp_s)
    terms = torch.where(m[:, :, None] & cols, terms, 0.0)  # valid (row, col) pairs only
    return terms.sum(dim=(-2, -1)) / n.clamp(min=1.0), n  # mean over valid rows


def relation_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """KL relation loss: per valid row ``KL(softmax(R_t/tau) || softmax(R_s/tau))``.

    Softmax runs over valid columns only; mean over valid rows, then over
    non-empty sequences.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    with _no_autocast(s.device):
        su, tu, m = _prepare(s, t, mask)
        return _mean_over_sequences(*_kl_per_seq(su, tu, m, tau))


def choose_impl(form: str, d_student: int, d_teacher: int, seq_len: int, impl: str = "auto") -> str:
    """Resolve ``impl`` to one of the form's implementations (``"naive"`` or ``"gram"``).

    ``"auto"``: the form's own choice (``mse_auto_impl`` for MSE), naive where it has none (KL).
    """
    spec = forms.get(form)
    if impl not in IMPLS:
        raise ValueError(f"unknown relation impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        auto = spec.function("auto")
        return auto(d_student, d_teacher, seq_len) if auto else "naive"
    if impl not in spec.impls:
        having = " or ".join(f"form={name!r}" for name in forms.with_impl(impl))
        raise ValueError(f"impl={impl!r} is only available for {having} (form {form!r} has {', '.join(spec.impls)})")
    return impl


def mse_auto_impl(d_student: int, d_teacher: int, seq_len: int) -> str:
    """``impl=auto`` for MSE: Gram when ``Ds == Dt < L`` (the ``D x D`` products are then smaller than
    the ``L x L`` ones), naive otherwise. Unequal widths get naive: the Gram form has no
    cancellation-free rearrangement for them and loses all digits near convergence (module doc)."""
    if d_student != d_teacher:
        return "naive"
    return "gram" if d_student < seq_len else "naive"


def mse_loss(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, tau: float, impl: str) -> torch.Tensor:
    """The ``mse`` form of one pair (``tau`` unused)."""
    return relation_mse_gram(s, t, mask) if impl == "gram" else relation_mse_naive(s, t, mask)


def kl_loss(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, tau: float, impl: str) -> torch.Tensor:
    """The ``kl`` form of one pair (always naive)."""
    return relation_kl(s, t, mask, tau)


def relation_loss(
    s: torch.Tensor,
    t: torch.Tensor,
    mask: torch.Tensor,
    form: str = "mse",
    tau: float = 1.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Relation distillation loss between student ``s`` and (detached) teacher ``t``.

    Args:
        s: student ``[B, L, Ds]`` or ``[B, H, L, Ds]``.
        t: teacher, same leading dims as ``s``; feature dim and dtype may differ.
        mask: ``[B, L]`` bool or 0/1, true = real token.
        form: a name of ``tcd_ds/distill/forms.py``: ``"mse"`` or ``"kl"``.
        tau: softmax temperature of the KL form.
        impl: ``"auto"``, ``"naive"`` or ``"gram"`` (MSE only); see :func:`choose_impl`.

    Returns:
        fp32 scalar (fp64 if an input is fp64).
    """
    _check_pair(s, t, mask)
    chosen = choose_impl(form, s.shape[-1], t.shape[-1], s.shape[-2], impl)
    return forms.get(form).function("loss")(s, t, mask, tau, chosen)


GROUP_BYTES = 256 * 2**20  # the naive path's L x L matrices of one stacked group stay below this


def relation_losses(
    students: Sequence[torch.Tensor],
    teachers: Sequence[torch.Tensor],
    mask: torch.Tensor,
    form: str = "mse",
    tau: float = 1.0,
    impl: str = "auto",
) -> torch.Tensor:
    """``relation_loss(students[i], teachers[i], mask, ...)`` for every pair, as a ``[K]`` tensor.

    Pairs whose student and teacher shapes and dtypes agree are stacked along the batch dim and
    computed in one call (the naive path's ``L x L`` matrices of one call are kept under
    ``GROUP_BYTES``); each pair keeps its own mean over its sequences, so entry ``i`` equals the
    single-pair :func:`relation_loss` (up to float rounding).
    """
    if len(students) != len(teachers):
        raise ValueError(f"{len(students)} student tensors but {len(teachers)} teacher tensors")
    if not students:
        raise ValueError("relation_losses needs at least one pair")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    spec = forms.get(form)
    groups: dict[tuple, list[int]] = {}
    for i, (s, t) in enumerate(zip(students, teachers)):
        _check_pair(s, t, mask)
        groups.setdefault((s.shape, t.shape, s.dtype, t.dtype), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(students)
    with _no_autocast(students[0].device):
        for (s_shape, t_shape, _, _), idx in groups.items():
            chosen = choose_impl(form, s_shape[-1], t_shape[-1], s_shape[-2], impl)
            per_pair = len(idx)
            if chosen == "naive":
                seqs = s_shape[0] * (s_shape[1] if len(s_shape) == 4 else 1)
                pair_bytes = seqs * s_shape[-2] ** 2 * 8
                per_pair = max(1, GROUP_BYTES // max(pair_bytes, 1))
            for c in range(0, len(idx), per_pair):
                chunk = idx[c:c + per_pair]
                losses = _stacked_losses(spec, [students[i] for i in chunk], [teachers[i] for i in chunk], mask,
                                         tau, chosen)
                for i, loss in zip(chunk, losses.unbind(0)):
                    out[i] = loss
    return torch.stack(out)


def _stacked_losses(spec: forms.Form, students: list[torch.Tensor], teachers: list[torch.Tensor],
                    mask: torch.Tensor, tau: float, chosen: str) -> torch.Tensor:
    """Losses ``[K]`` of K same-shape pairs: the form's stacked ``losses``, else one ``loss`` per pair."""
    stacked = spec.function("losses")
    if stacked is not None:
        return stacked(students, teachers, mask, tau, chosen)
    single = spec.function("loss")
    return torch.stack([single(s, t, mask, tau, chosen) for s, t in zip(students, teachers)])


def mse_losses(students: list[torch.Tensor], teachers: list[torch.Tensor], mask: torch.Tensor, tau: float,
               impl: str) -> torch.Tensor:
    """The ``mse`` form of K same-shape pairs ``[K]`` (``tau`` unused)."""
    return _mse_losses(students, teachers, mask, impl)


def kl_losses(students: list[torch.Tensor], teachers: list[torch.Tensor], mask: torch.Tensor, tau: float,
              impl: str) -> torch.Tensor:
    """The ``kl`` form of K same-shape pairs ``[K]``, computed as one batch of K * N sequences."""
    k = len(students)
    s = torch.cat([_flat(x, mask)[0] for x in students])
    t = torch.cat([_flat(x, mask)[0] for x in teachers])
    m = _flat(students[0], mask)[1].repeat(k, 1)
    dtype = _compute_dtype(s, t)
    per_seq, n = _kl_per_seq(_unit_rows(s, m, dtype), _unit_rows(t, m, dtype), m, tau)
    per_seq, n = per_seq.view(k, -1), n.view(k, -1)
    nonempty = (n > 0).to(per_seq.dtype)
    return (per_seq * nonempty).sum(-1) / nonempty.sum(-1).clamp(min=1.0)


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Uniform (TinyBERT-style) student-to-teacher transformer-layer alignment.

    Student layer ``i`` (1-based) is aligned to teacher layer
    ``round(i * n_teacher / n_student)`` (1-based; halves round up, and never
    below layer 1). Equal depths map identically; a 4-layer student on a
    12-layer teacher gets teacher layers 3, 6, 9, 12; a student deeper than its
    teacher repeats teacher layers (12 on 6: 1, 1, 2, 2, ..., 6, 6).

    Only transformer layers are covered: the embedding output (layer 0) is
    handled by the caller and always maps to teacher layer 0.

    Returns:
        list of length ``n_student``: 0-based teacher transformer-layer index for
        each 0-based student transformer layer.
    """
    ns, nt = operator.index(n_student), operator.index(n_teacher)
    if ns < 1 or nt < 1:
        raise ValueError(f"layer counts must be >= 1, got n_student={ns}, n_teacher={nt}")
    # floor(i*nt/ns + 1/2) in exact integer arithmetic
    return [max(1, (2 * i * nt + ns) // (2 * ns)) - 1 for i in range(1, ns + 1)]
