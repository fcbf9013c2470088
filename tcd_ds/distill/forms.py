"""The relation-loss forms by name (`distill.form`): one `_REGISTRY`, `register` and `get`, like the
MoE backends' (`tcd_ds/model/experts/registry.py`).

A form is a function, named by its dotted path `module:function` and imported only when a loss is
computed (so `tcd_ds/config.py` reads the names without importing torch):

    loss(s, t, mask, tau, impl) -> scalar      one student/teacher pair, already checked, `impl` resolved

and optionally `losses(students, teachers, mask, tau, impl) -> [K]` for K pairs of one shape stacked
into one batch (autocast off; without it `relation_losses` calls `loss` once per pair). `impls` are the
implementations it has: `naive` builds the L x L relation matrices (`relation_losses` keeps a group of
them under `GROUP_BYTES`); `gram` is the MSE's D x D fast path. `auto` names the function
`(d_student, d_teacher, seq_len) -> impl` that `impl=auto` resolves with (None: naive).

Config validation (`DistillConfig.validate`) and `tcd_ds/distill/relation.py` (`choose_impl`,
`relation_loss`, `relation_losses`) read this registry. Adding a form is one file with its `loss`
plus one `register(...)` at the bottom of this file (docs/extending.md).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

IMPLS = ("auto", "naive", "gram")


@dataclass(frozen=True)
class Form:
    name: str
    loss: str  # "module:function": one pair
    losses: str | None = None  # "module:function": K same-shape pairs at once (None: one `loss` per pair)
    impls: tuple[str, ...] = ("naive",)
    auto: str | None = None  # "module:function": the impl `auto` picks (None: naive)
    uses_tau: bool = False  # a softmax temperature (distill.tau) enters the loss

    def function(self, which: str) -> Callable | None:
        path = getattr(self, which)
        if path is None:
            return None
        module, _, attr = path.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, Form] = {}


def register(form: Form) -> Form:
    if form.name in _REGISTRY:
        raise ValueError(f"relation form {form.name!r} is already registered")
    if not set(form.impls) <= set(IMPLS[1:]) or "naive" not in form.impls:
        raise ValueError(f"relation form {form.name!r}: impls must include naive and be among {IMPLS[1:]}")
    _REGISTRY[form.name] = form
    return form


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Form:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown relation form {name!r}; expected one of {names()}") from None


def with_impl(impl: str) -> tuple[str, ...]:
    """The forms that have implementation `impl`."""
    return tuple(n for n, f in _REGISTRY.items() if impl in f.impls)


# --- the forms ------------------------------------------------------------------------------

register(Form("mse", "tcd_ds.distill.relation:mse_loss", losses="tcd_ds.distill.relation:mse_losses",
              impls=("naive", "gram"), auto="tcd_ds.distill.relation:mse_auto_impl"))
register(Form("kl", "tcd_ds.distill.relation:kl_loss", losses="tcd_ds.distill.relation:kl_losses", uses_tau=True))
