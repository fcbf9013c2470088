"""The MoE backends by name (`model.moe.backend`): one `_REGISTRY`, `register` and `get`, after
MegaBlocks' `layers/dmlp_registry.py`.

A backend is a builder, `build(cfg: ModelConfig) -> nn.Module` whose `forward(x [B, S, H])` returns
`(y [B, S, H], MoEStats)` (see `tcd_ds/model/moe.py`), named by its dotted path `module:function` and
imported only when a layer is built, so `tcd_ds/config.py` reads the names without importing torch or
DeepSpeed; and what it needs to run, which everything else reads from here:

- `MoEConfig.validate` (`tcd_ds/config.py`): the names, and which backends take `ep_size > 1`;
- `tcd_ds.model.moe.build_moe`: the builder;
- the trainer's `check_gpu_paths` and `load_ds_config` (`tcd_ds/train.py`): `refusal` (device, DeepSpeed
  precision, optional package) and `zero3`;
- `python -m tcd_ds.gpucheck` and `python -m tcd_ds.bench`: the list (`names`), `unavailable` (why a
  backend cannot be tried here), `biases` and `exact_routing`.

Adding a backend is one file in this folder (its module and `build`) plus one `register(...)` at the
bottom of this file (docs/extending.md). Optional conversions a backend module may define, used by
`tcd_ds/model/hf.py` and gpucheck when present: `canonical_state_dict()` / `load_canonical_state_dict(sd)`
(when its parameters are not already `router.weight`, `experts.w1`, `b1`, `w2`, `b2`),
`canonical_grads()` and `route_hook(fn)` (calls `fn(expert [T, k])` on each routing).
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEVICE_WORDS = {"cuda": "an NVIDIA GPU", "cpu": "a CPU"}
PRECISIONS = ("fp32", "bf16", "fp16")  # a DeepSpeed config's training precision


@dataclass(frozen=True)
class Backend:
    """One MoE backend: its builder and what it needs. `hints` are the one-line fixes the trainer's
    refusals end with, by requirement: `device`, `package`, `dtype` (and `dtype_reason`: why only
    `dtypes`)."""

    name: str
    builder: str  # "module:function", imported lazily
    devices: tuple[str, ...] = ("cpu", "cuda")  # torch device types it runs on
    dtypes: tuple[str, ...] = PRECISIONS  # DeepSpeed precisions it trains in
    package: str | None = None  # an optional package it needs (checked with find_spec, not imported)
    expert_parallel: bool = False  # takes model.moe.ep_size > 1 (else all experts live on every rank)
    probe: str | None = None  # "module:function", (device type) -> None or why it cannot run here
    biases: bool = True  # its experts have biases (gpucheck compares it on bias-free weights otherwise)
    exact_routing: bool = True  # routes as our fp32 router does (gpucheck: equal counts; else most tokens alike)
    zero3: str = "for MoE models here"  # how ZeRO stage 3 is refused: "not supported <zero3>"
    hints: dict[str, str] = field(default_factory=dict)

    def build(self, cfg: Any) -> Any:
        return _load(self.builder)(cfg)


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a backend (a name may be registered once)."""
    if backend.name in _REGISTRY:
        raise ValueError(f"MoE backend {backend.name!r} is already registered")
    if not set(backend.dtypes) <= set(PRECISIONS) or not set(backend.devices) <= set(DEVICE_WORDS):
        raise ValueError(f"MoE backend {backend.name!r}: dtypes must be among {PRECISIONS}, devices among "
                         f"{tuple(DEVICE_WORDS)}")
    _REGISTRY[backend.name] = backend
    return backend


def names() -> tuple[str, ...]:
    """Every registered backend, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown MoE backend {name!r} (one of {', '.join(_REGISTRY)})") from None


def _load(path: str) -> Callable:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _needs_device(backend: Backend) -> str:
    return " or ".join(DEVICE_WORDS[d] for d in backend.devices)


def refusal(name: str, device_type: str, precision: str, path: str) -> str | None:
    """Why the trainer must refuse backend `name` on `device_type` with a DeepSpeed config (`path`) that
    trains in `precision` (fp32 | bf16 | fp16), as one line ending with the fix; None when it can run."""
    b = get(name)
    if device_type not in b.devices:
        return (f"model.moe.backend={name} needs {_needs_device(b)} and this run is on {device_type}: "
                f"{b.hints.get('device', 'choose another model.moe.backend')}")
    if b.package and importlib.util.find_spec(b.package) is None:
        return (f"model.moe.backend={name} needs the {b.package} package, which is not installed: "
                f"{b.hints.get('package', f'pip install {b.package}')}")
    if precision not in b.dtypes:
        reason = b.hints.get("dtype_reason", f"trains in {' or '.join(b.dtypes)} only")
        return (f"{path}: model.moe.backend={name} {reason}, but this config trains in {precision}: "
                f"{b.hints.get('dtype', 'use a DeepSpeed config in ' + ' or '.join(b.dtypes))}")
    return None


def unavailable(name: str, device_type: str) -> str | None:
    """None when backend `name` can be tried on `device_type` here, or why not (gpucheck, bench)."""
    b = get(name)
    if device_type not in b.devices:
        return f"needs {_needs_device(b)}"
    if b.package and importlib.util.find_spec(b.package) is None:
        return f"{b.package} is not installed"
    if b.probe is None:
        return None
    try:
        probe = _load(b.probe)
    except Exception as err:  # noqa: BLE001 - a backend whose module (or what it imports) does not import
        return f"{b.package or b.name} does not import: {str(err).splitlines()[0] if str(err) else repr(err)}"
    return probe(device_type)


def expert_parallel() -> tuple[str, ...]:
    """The backends that take model.moe.ep_size > 1."""
    return tuple(n for n, b in _REGISTRY.items() if b.expert_parallel)


# --- the backends ---------------------------------------------------------------------------

register(Backend("torch", "tcd_ds.model.moe:build_loop"))
register(Backend("grouped", "tcd_ds.model.moe:build_grouped", probe="tcd_ds.model.experts.grouped:unavailable"))
register(Backend("deepspeed", "tcd_ds.model.experts.expert_parallel:build", expert_parallel=True,
                 probe="tcd_ds.model.experts.expert_parallel:unavailable", zero3="with DeepSpeed-MoE"))
register(Backend(
    "megablocks", "tcd_ds.model.experts.dropless:build", devices=("cuda",), dtypes=("bf16",), package="megablocks",
    probe="tcd_ds.model.experts.dropless:unavailable", biases=False, exact_routing=False,
    hints={"device": "set model.moe.backend=grouped (dropless grouped matmuls) or torch",
           "package": "pip install -r requirements-gpu.txt, or set model.moe.backend=grouped",
           "dtype_reason": "runs MegaBlocks' grouped GEMMs, which take bf16 only",
           "dtype": "enable \"bf16\" in the DeepSpeed config (e.g. ds_configs/gpu_zero2_bf16.json) or set "
                    "model.moe.backend=grouped"}))
