"""Token-relation losses for Transfer Capability Distillation (TCD).

A *relation* of one token set ``X`` (one sequence, or one sequence of one head
for the attention position) is its cosine-similarity matrix over the
non-padding tokens::

    R(X)_ij = cos(x_i, x_j)        i, j valid tokens

The student's relations are pulled towards the (frozen) teacher's. Two forms:

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
  undefined (same caveat applies in that case).
"""
from __future__ import annotations

import contextlib
import operator
from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = [
    "relation_loss",
    "relation_mse_naive",
    "relation_mse_gram",
    "relation_kl",
    "relation_matrix",
    "choose_impl",
    "uniform_layer_map",
]

FORMS = ("mse", "kl")
IMPLS = ("auto", "naive", "gram")
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


def relation_mse_naive(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE relation loss via explicit ``L x L`` cosine matrices (see module doc)."""
    with _no_autocast(s.device):
        su, tu, m = _prepare(s, t, mask)
        n = m.sum(-1).to(su.dtype)
        diff = su @ su.mT - tu @ tu.mT  # padding rows/cols are 0 in both
        per_seq = _sq_frob(diff) / n.square().clamp(min=1.0)
        return _mean_over_sequences(per_seq, n)


def relation_mse_gram(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE relation loss from feature-dim Gram matrices only (no ``L x L``).

    Same value as :func:`relation_mse_naive`; cost O(L D^2) time and O(D^2)
    extra memory per sequence. Uses the cancellation-free form when ``Ds == Dt``
    (see module doc).
    """
    with _no_autocast(s.device):
        su, tu, m = _prepare(s, t, mask)
        n = m.sum(-1).to(su.dtype)
        if su.shape[-1] == tu.shape[-1]:
            delta, total = su - tu, su + tu
            dd = delta.mT @ delta  # [N, D, D]
            tt = total.mT @ total
            dt = delta.mT @ total
            sq = 0.5 * ((dd * tt).sum(dim=(-2, -1)) + (dt * dt.mT).sum(dim=(-2, -1)))
        else:
            sq = _sq_frob(su.mT @ su) - 2.0 * _sq_frob(su.mT @ tu) + _sq_frob(tu.mT @ tu)
        per_seq = sq / n.square().clamp(min=1.0)
        return _mean_over_sequences(per_seq, n)


def relation_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """KL relation loss: per valid row ``KL(softmax(R_t/tau) || softmax(R_s/tau))``.

    Softmax runs over valid columns only; mean over valid rows, then over
    non-empty sequences.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    with _no_autocast(s.device):
        su, tu, m = _prepare(s, t, mask)
        n = m.sum(-1).to(su.dtype)
        cols = m[:, None, :]  # [N, 1, L]
        neg = torch.finfo(su.dtype).min  # finite, so empty rows stay NaN-free
        logp_s = ((su @ su.mT) / tau).masked_fill(~cols, neg).log_softmax(dim=-1)
        logp_t = ((tu @ tu.mT) / tau).masked_fill(~cols, neg).log_softmax(dim=-1)
        terms = logp_t.exp() * (logp_t - logp_s)
        terms = torch.where(m[:, :, None] & cols, terms, 0.0)  # valid (row, col) pairs only
        per_seq = terms.sum(dim=(-2, -1)) / n.clamp(min=1.0)  # mean over valid rows
        return _mean_over_sequences(per_seq, n)


def choose_impl(form: str, d_student: int, d_teacher: int, seq_len: int, impl: str = "auto") -> str:
    """Resolve ``impl`` to ``"naive"`` or ``"gram"``.

    ``"auto"``: Gram for MSE when ``max(Ds, Dt) < L`` (the ``D x D`` products are
    then smaller than the ``L x L`` ones), naive otherwise; KL is always naive.
    """
    if form not in FORMS:
        raise ValueError(f"unknown relation form {form!r}; expected one of {FORMS}")
    if impl not in IMPLS:
        raise ValueError(f"unknown relation impl {impl!r}; expected one of {IMPLS}")
    if form == "kl":
        if impl == "gram":
            raise ValueError("impl='gram' is only available for form='mse' (KL needs the L x L matrices)")
        return "naive"
    if impl != "auto":
        return impl
    return "gram" if max(d_student, d_teacher) < seq_len else "naive"


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
        form: ``"mse"`` or ``"kl"``.
        tau: softmax temperature of the KL form.
        impl: ``"auto"``, ``"naive"`` or ``"gram"`` (MSE only); see :func:`choose_impl`.

    Returns:
        fp32 scalar (fp64 if an input is fp64).
    """
    _check_pair(s, t, mask)
    chosen = choose_impl(form, s.shape[-1], t.shape[-1], s.shape[-2], impl)
    if form == "kl":
        return relation_kl(s, t, mask, tau)
    if chosen == "gram":
        return relation_mse_gram(s, t, mask)
    return relation_mse_naive(s, t, mask)


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
