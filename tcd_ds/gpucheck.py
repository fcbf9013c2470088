"""`python -m tcd_ds.gpucheck`: run every GPU path once, with asserts (see docs/gpu.md).

Four checks, each a function of `device`, so the same code runs on CPU (small sizes, in CI:
tests/test_gpucheck.py) and on a GPU (the sizes below, under 8 minutes on one GPU):

1. `check_backends`: each MoE backend registered (`tcd_ds/model/experts/registry.py`: torch, grouped,
   deepspeed, megablocks when it imports and builds) loaded with the same canonical weights, forward + backward of `sum(y * g) + aux` on the
   same tokens; output, input gradient and every weight gradient equal the `torch` backend's at the
   same dtype within `TOLERANCES[dtype]` (relative Frobenius error, and max error over the reference's
   max). The `torch` backend's own error against its fp32 run is printed beside it (the dtype's noise
   floor). MegaBlocks routes in the activations' dtype (ours routes in fp32), so it is compared on
   the tokens both route alike (at least `MIN_SAME_ROUTE` of them) against a bias-free reference.
2. `check_teacher_dtypes`: the frozen teacher in fp16 (the default on CUDA) or bf16 against the same
   teacher in fp32, same batch: every tap's relation matrix (cosines, in [-1, 1]) within
   `TEACHER_TOLERANCES[dtype][0]` (max abs), and L_T, L_I, L_A of a fixed student against each teacher
   within `TEACHER_TOLERANCES[dtype][1]` (relative).
3. `check_tcd_steps`: `steps` TCD steps through the trainer's own pieces (`load_ds_config`,
   `build_model`, `build_teacher`, `build_engine` with GuardedAdamW, `forward_loss`, DeepSpeed's
   backward/step, its loss scaling in fp16) on 4 fixed batches: every loss term finite on every step,
   fewer than a quarter of the steps skipped (fp16's first steps may overflow while the loss scale
   settles), and the loss and the MLM loss of the last 10 steps below those of the first 10.
4. `measure_throughput`: tokens/s and MFU of the `moe` and `tcd` steps of a recipe (`base`: 64
   experts) under DeepSpeed, against this device's measured matmul peak (`measure_matmul_peak`), as
   the trainer defines MFU (student FLOPs only). Each backend is measured in a child process
   (`--throughput BACKEND`), so a 3.7B-parameter engine's memory is returned before the next.

Without a GPU it prints one line saying so, runs the CPU plan and exits 0 when its checks pass.
Exit status 1 when a check fails (every check runs; the failures are listed at the end).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tcd_ds.dist import free_port
from tcd_ds.model.experts import registry
from tcd_ds.resources import DS_CONFIGS, ROOT

# (relative Frobenius error, max abs error / max |reference|) of a backend against the torch backend
TOLERANCES = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (2e-2, 6e-2), torch.float16: (4e-3, 1e-2)}
# (max abs error of a relation matrix entry, relative error of L_T / L_I / L_A) against the fp32 teacher
# (measured on CPU, base teacher, batch 8x128: fp16 1.5e-3 / 3.4e-4, bf16 1.1e-2 / 1.2e-3)
TEACHER_TOLERANCES = {torch.float16: (1e-2, 5e-3), torch.bfloat16: (6e-2, 2e-2)}
MIN_SAME_ROUTE = 0.9  # megablocks (bf16 router) vs ours (fp32 router): share of tokens routed alike
RESULT_PREFIX = "GPUCHECK_RESULT "
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run: the GPU plan or the CPU plan (small enough for CI)."""

    experts: int
    hidden: int
    ffn: int
    tokens: tuple[int, int]  # (batch, sequence) of the backend check
    backend_dtypes: tuple[torch.dtype, ...]  # the backend check's dtypes
    grouped_only_dtypes: tuple[torch.dtype, ...]  # extra dtypes checked for grouped vs torch only
    teacher_recipe: str
    teacher_batch: tuple[int, int]
    teacher_dtypes: tuple[torch.dtype, ...]
    step_recipe: str
    step_overrides: tuple[str, ...]
    step_precisions: tuple[str, ...]  # "bf16" / "fp16": the DeepSpeed config of the TCD step check
    steps: int
    throughput_recipe: str
    throughput_overrides: tuple[str, ...]
    throughput_ds: str
    throughput_backends: tuple[str, ...]
    warmup: int
    repeats: int


GPU_PLAN = Plan(experts=64, hidden=768, ffn=3072, tokens=(32, 128), backend_dtypes=(torch.bfloat16,),
                grouped_only_dtypes=(torch.float16, torch.float32), teacher_recipe="base", teacher_batch=(8, 128),
                teacher_dtypes=(torch.float16, torch.bfloat16), step_recipe="small", step_overrides=(),
                step_precisions=("bf16", "fp16"), steps=50, throughput_recipe="base", throughput_overrides=(),
                throughput_ds="gpu_zero2_bf16.json", throughput_backends=("grouped", "torch"), warmup=3, repeats=10)
CPU_PLAN = Plan(experts=4, hidden=16, ffn=32, tokens=(3, 10), backend_dtypes=(torch.float32,),
                grouped_only_dtypes=(torch.bfloat16,), teacher_recipe="tiny", teacher_batch=(4, 64),
                teacher_dtypes=(torch.bfloat16,), step_recipe="tiny",
                step_overrides=("model.moe.num_experts=8", "train.micro_batch_size=8", "data.max_seq_len=32"),
                step_precisions=("bf16",), steps=50, throughput_recipe="tiny",
                throughput_overrides=("model.moe.num_experts=8", "train.micro_batch_size=8"),
                throughput_ds="cpu_zero2.json", throughput_backends=("torch",), warmup=1, repeats=2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """A one-rank torch.distributed + deepspeed.comm world (nccl on CUDA, gloo on CPU) with DeepSpeed's
    ep_size=1 expert groups, for the deepspeed backend and `deepspeed.initialize`. Reuses a world that
    exists; one it made is torn down on exit and the environment restored."""
    import deepspeed
    import deepspeed.comm as ds_comm

    from tcd_ds.model.experts.expert_parallel import ensure_expert_groups

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in names}
    owned = not torch.distributed.is_initialized()
    if owned:
        port = free_port()
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not ds_comm.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)
    ensure_expert_groups(1)
    try:
        yield
    finally:
        if owned:
            ds_comm.destroy_process_group()  # also drops DeepSpeed's cached expert groups
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# --------------------------------------------------------------------------- 1. MoE backends

def rel_errors(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(||a - ref|| / ||ref||, max |a - ref| / max |ref|), in fp64."""
    a, ref = a.detach().double(), ref.detach().double()
    diff = a - ref
    scale, peak = ref.norm().clamp(min=1e-30), ref.abs().max().clamp(min=1e-30)
    return float(diff.norm() / scale), float(diff.abs().max() / peak)


def canonical_weights(experts: int, hidden: int, ffn: int, seed: int = 0, biases: bool = True
                      ) -> dict[str, torch.Tensor]:
    """Random canonical MoE weights (fp32, CPU) at unit activation scale: a router whose logits are well
    apart (std ~2), experts whose output is O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std):
        return torch.randn(*shape, generator=gen) * std

    sd = {"router.weight": randn(experts, hidden, std=2.0 / math.sqrt(hidden)),
          "experts.w1": randn(experts, hidden, ffn, std=1.0 / math.sqrt(hidden)),
          "experts.b1": randn(experts, ffn, std=0.1),
          "experts.w2": randn(experts, ffn, hidden, std=1.0 / math.sqrt(ffn)),
          "experts.b2": randn(experts, hidden, std=0.1)}
    if not biases:
        sd["experts.b1"].zero_()
        sd["experts.b2"].zero_()
    return sd


def _moe_config(backend: str, experts: int, hidden: int, ffn: int, top_k: int):
    from tcd_ds.config import ModelConfig, MoEConfig

    cfg = ModelConfig(hidden_size=hidden, intermediate_size=ffn, num_heads=1, moe=MoEConfig(
        num_experts=experts, top_k=top_k, aux_loss_weight=0.01, z_loss_weight=0.1, backend=backend))
    cfg.validate()
    return cfg


def build_backend(backend: str, experts: int, hidden: int, ffn: int, top_k: int,
                  sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An MoE layer of `backend` holding the canonical weights `sd` (raises if it cannot be built here):
    through its `load_canonical_state_dict` where it has one, else its parameters are the canonical ones."""
    from tcd_ds.model.moe import build_moe

    layer = build_moe(_moe_config(backend, experts, hidden, ffn, top_k))
    if hasattr(layer, "load_canonical_state_dict"):
        layer.load_canonical_state_dict(sd)
    else:
        layer.load_state_dict(sd)
    return layer


def canonical_grads(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameter gradients of `layer` in the canonical layout (its `canonical_grads` where it has one)."""
    if hasattr(layer, "canonical_grads"):
        return layer.canonical_grads()
    return {name: p.grad for name, p in layer.named_parameters()}


def _route_hook(layer: torch.nn.Module, top_k: int, seen: dict) -> Any:
    """Capture the [T, k] experts each token was routed to (sorted, so the order of the k is moot), where
    the backend offers a `route_hook`."""
    def keep(expert):
        seen["route"] = expert.reshape(-1, top_k).sort(dim=-1).values

    return layer.route_hook(keep) if hasattr(layer, "route_hook") else None


def run_backend(backend: str, layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, top_k: int
                ) -> dict[str, Any]:
    """Forward + backward of `sum(y * g) + stats.loss`: y, the input gradient, the weight gradients,
    the balance loss, the counts and the routes (None where the backend's router is not hooked)."""
    seen: dict = {}
    handle = _route_hook(layer, top_k, seen)
    x = x.detach().clone().requires_grad_(True)
    try:
        y, stats = layer(x)
        ((y.float() * g).sum() + stats.loss).backward()
    finally:
        if handle is not None:
            handle.remove()
    return {"y": y.detach(), "dx": x.grad, "grads": canonical_grads(layer),
            "balance": stats.balance_loss.detach(), "counts": stats.counts, "route": seen.get("route")}


def available_backends(device: torch.device) -> dict[str, str | None]:
    """Every registered backend -> None when it can be tried here, or why not."""
    return {name: registry.unavailable(name, device.type) for name in registry.names()}


def _compare(backend: str, out: dict, ref: dict, hidden: int, tag: str, rel_tol: float,
             max_tol: float) -> dict[str, float]:
    """One backend's output, input gradient, balance loss and weight gradients against the torch
    backend's (MegaBlocks: on the tokens it routes alike, and those must be most); AssertionError
    naming the tensor that differs beyond the tolerances. Returns the relative errors."""
    errors: dict[str, float] = {}
    rows = slice(None)
    exact = registry.get(backend).exact_routing
    if out["route"] is not None and not exact:
        same = (out["route"] == ref["route"]).all(dim=-1)
        errors["same_route"] = float(same.float().mean())
        assert errors["same_route"] >= MIN_SAME_ROUTE, (
            f"{backend} ({tag}) routes only {errors['same_route']:.1%} of the tokens like the torch backend "
            f"(< {MIN_SAME_ROUTE:.0%})")
        rows = same
    else:
        assert torch.equal(out["counts"].cpu(), ref["counts"].cpu()), f"{backend} ({tag}): counts differ"
    pairs = {"y": (out["y"].reshape(-1, hidden)[rows], ref["y"].reshape(-1, hidden)[rows]),
             "dx": (out["dx"].reshape(-1, hidden)[rows], ref["dx"].reshape(-1, hidden)[rows])}
    if exact:  # otherwise its weight gradients mix in the tokens it routes elsewhere
        pairs["balance"] = (out["balance"].reshape(1), ref["balance"].reshape(1))
        pairs.update({name: (grad, ref["grads"][name]) for name, grad in out["grads"].items()})
    for name, (a, b) in pairs.items():
        rel, mx = rel_errors(a, b)
        errors[name] = rel
        assert rel <= rel_tol and mx <= max_tol, (
            f"{backend} differs from the torch backend ({tag}) in {name}: relative error {rel:.2e} "
            f"(tolerance {rel_tol:.0e}), max error {mx:.2e} of the largest value (tolerance {max_tol:.0e})")
    return errors


def check_backends(device: torch.device, dtype: torch.dtype, experts: int, hidden: int, ffn: int,
                   tokens: tuple[int, int], top_k: int = 1, backends: tuple[str, ...] | None = None,
                   log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Every backend in `backends` (default: every one available) against the torch backend at `dtype`
    on `device`; raises AssertionError naming the backend and the tensor that differs. Returns the
    errors per backend (and `torch@fp32`: the torch backend at `dtype` against itself in fp32)."""
    rel_tol, max_tol = TOLERANCES[dtype]
    avail = available_backends(device)
    wanted = backends or tuple(avail)
    gen = torch.Generator().manual_seed(1)
    shape = (*tokens, hidden)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    g = torch.randn(shape, generator=gen).to(device)
    tag = f"{NAMES[dtype]} top-{top_k} E={experts} H={hidden} F={ffn} T={tokens[0] * tokens[1]}"
    results: dict[str, dict[str, float]] = {}
    refs: dict[bool, dict] = {}

    def reference(biases: bool) -> dict:
        if biases not in refs:
            sd = canonical_weights(experts, hidden, ffn, biases=biases)
            ref_layer = build_backend("torch", experts, hidden, ffn, top_k, sd).to(device=device, dtype=dtype)
            refs[biases] = run_backend("torch", ref_layer, x, g, top_k)
            if biases and dtype != torch.float32:  # the dtype's own noise: torch at dtype vs torch in fp32
                exact = build_backend("torch", experts, hidden, ffn, top_k, sd).to(device=device)
                r32 = run_backend("torch", exact, x.float(), g, top_k)
                results["torch@fp32"] = {"y": rel_errors(refs[biases]["y"], r32["y"])[0],
                                         "dx": rel_errors(refs[biases]["dx"], r32["dx"])[0]}
                log(f"backends {tag}: torch {NAMES[dtype]} vs torch fp32 (noise floor): "
                    f"y {results['torch@fp32']['y']:.2e}, dx {results['torch@fp32']['dx']:.2e}")
        return refs[biases]

    for backend in wanted:
        if backend == "torch":
            continue
        if avail.get(backend):
            log(f"backends {tag}: {backend} skipped ({avail[backend]})")
            continue
        spec = registry.get(backend)
        biases = spec.biases  # MegaBlocks' experts have none
        ref = reference(biases)
        sd = canonical_weights(experts, hidden, ffn, biases=biases)
        try:
            layer = build_backend(backend, experts, hidden, ffn, top_k, sd)
        except RuntimeError as err:
            if spec.package is None:  # a backend on an optional package may still fail to build
                raise
            log(f"backends {tag}: {backend} skipped ({str(err).splitlines()[0]})")
            continue
        out = run_backend(backend, layer.to(device=device, dtype=dtype), x, g, top_k)
        errors = _compare(backend, out, ref, hidden, tag, rel_tol, max_tol)
        results[backend] = errors
        worst = max((k for k in errors if k != "same_route"), key=errors.get)
        log(f"backends {tag}: {backend} == torch: worst relative error {errors[worst]:.2e} ({worst}), "
            f"y {errors['y']:.2e}, dx {errors['dx']:.2e}"
            + (f", {errors['same_route']:.1%} routed alike" if "same_route" in errors else "") + " ok")
        del layer, out
        _release(device)
    return results


# --------------------------------------------------------------------------- 2. teacher dtypes

def _save_vanilla(recipe: str, directory: Path, overrides: tuple[str, ...] = ()) -> None:
    """The recipe's vanilla model with random weights, saved as a teacher model directory."""
    from tcd_ds.config import build_config
    from tcd_ds.model.hf import save_pretrained
    from tcd_ds.train import build_model

    cfg = build_config(recipe, ["mode=vanilla", *overrides])
    model, mcfg = build_model(cfg, cfg.model.vocab_size)
    save_pretrained(model, mcfg, directory)


def _token_batch(batch: int, seq: int, vocab: int, seed: int, device: torch.device, pad_last: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(999, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last and batch > 1:
        mask[-1, seq // 2:] = 0  # one half-padded sequence: the masks are exercised too
        ids[-1, seq // 2:] = 0
    return ids.to(device), mask.to(device), torch.zeros_like(ids).to(device)


def check_teacher_dtypes(device: torch.device, dtype: torch.dtype, recipe: str = "tiny",
                         batch: tuple[int, int] = (4, 64), log: Callable[[str], None] = print
                         ) -> dict[str, float]:
    """The teacher at `dtype` (fp16: CUDA only) against the same teacher in fp32: relation matrices of
    every tap and the relation losses of a fixed student, within TEACHER_TOLERANCES[dtype]."""
    from tcd_ds.config import DistillConfig
    from tcd_ds.distill.objective import RelationObjective
    from tcd_ds.distill.relation import relation_matrix
    from tcd_ds.distill.teacher import load_teacher

    entry_tol, loss_tol = TEACHER_TOLERANCES[dtype]
    distill = DistillConfig()
    with tempfile.TemporaryDirectory(prefix="tcd-gpucheck-teacher-") as tmp:
        torch.manual_seed(0)
        _save_vanilla(recipe, Path(tmp))
        exact = load_teacher(tmp, distill, "fp32", device)
        low = load_teacher(tmp, distill, NAMES[dtype], device)
    cfg = exact.config
    ids, mask, types = _token_batch(*batch, cfg.vocab_size, 2, device)
    t32, tlo = exact(ids, mask, types), low(ids, mask, types)
    assert next(low.parameters()).dtype == dtype and set(t32) == set(tlo)
    worst_key, worst = None, 0.0
    for key in t32:
        assert tlo[key].dtype == dtype, f"teacher tap {key} is {tlo[key].dtype}, not {dtype}"
        err = float((relation_matrix(tlo[key], mask) - relation_matrix(t32[key], mask)).abs().max())
        if err >= worst:
            worst_key, worst = key, err
    gen = torch.Generator().manual_seed(3)
    student = {k: (v + 0.5 * v.std() * torch.randn(v.shape, generator=gen).to(v.device)).float()
               for k, v in t32.items()}  # a fixed student near the teacher: what distillation drives towards
    objective = RelationObjective(distill, cfg.num_layers, cfg.num_layers)
    _, terms32 = objective(student, t32, mask)
    _, termslo = objective(student, tlo, mask)
    loss_err = {p: abs(float(termslo[p]) - float(terms32[p])) / abs(float(terms32[p])) for p in distill.positions}
    log(f"teacher {NAMES[dtype]} vs fp32 ({recipe}, {cfg.num_layers} layers x {cfg.hidden_size}, batch "
        f"{batch[0]}x{batch[1]}, {len(t32)} taps): relation entries max error {worst:.2e} at {worst_key} "
        f"(tolerance {entry_tol:.0e}); relation losses relative error "
        + ", ".join(f"L_{p} {e:.2e}" for p, e in loss_err.items()) + f" (tolerance {loss_tol:.0e})")
    assert worst <= entry_tol, (f"the {NAMES[dtype]} teacher's relations differ from the fp32 teacher's by "
                                f"{worst:.2e} at tap {worst_key} (tolerance {entry_tol:.0e})")
    for p, e in loss_err.items():
        assert e <= loss_tol, (f"L_{p} against the {NAMES[dtype]} teacher differs from that against the fp32 "
                               f"teacher by {e:.2e} relative (tolerance {loss_tol:.0e})")
    del exact, low
    _release(device)
    return {"relation_max_error": worst, **{f"L_{p}": e for p, e in loss_err.items()}}


# --------------------------------------------------------------------------- 3. TCD steps

def _mlm_batches(cfg, n: int, device: torch.device, seed: int = 0, ids_range: int = 512
                 ) -> list[dict[str, torch.Tensor]]:
    """`n` fixed full-length batches of ids from a small range (so the MLM loss has something to learn
    in a few dozen steps), masked by the trainer's `mask_tokens`."""
    from tcd_ds.data.mlm import mask_tokens
    from tcd_ds.data.tokenizer import SpecialIds

    vocab, b, s = cfg.model.vocab_size, cfg.train.micro_batch_size, cfg.data.max_seq_len
    special = SpecialIds(pad=0, unk=100, cls=101, sep=102, mask=103, vocab_size=vocab)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(999, min(vocab, 999 + ids_range), (b, s), generator=gen)
        ids[:, 0], ids[:, -1] = special.cls, special.sep
        mask = torch.ones(b, s, dtype=torch.long)
        masked, labels = mask_tokens(ids, mask, special, vocab, gen, cfg.data.mlm_probability)
        out.append({k: v.to(device) for k, v in {"input_ids": masked, "attention_mask": mask,
                                                 "token_type_ids": torch.zeros_like(ids), "labels": labels}.items()})
    return out


def _tcd_run(device: torch.device, recipe: str, backend: str, ds_file: str, overrides: tuple[str, ...]):
    """The trainer's pieces for one TCD run on `device`: (cfg, model config, engine, GuardedAdamW,
    taps, teacher, objective, the DeepSpeed config)."""
    from tcd_ds.config import build_config
    from tcd_ds.distill.taps import Taps, tap_points
    from tcd_ds.train import build_engine, build_model, build_teacher, load_ds_config

    with tempfile.TemporaryDirectory(prefix="tcd-gpucheck-teacher-") as tmp:
        torch.manual_seed(0)
        _save_vanilla(recipe, Path(tmp), tuple(o for o in overrides if not o.startswith("model.moe.")))
        cfg = build_config(recipe, ["mode=tcd", f"teacher.path={tmp}", f"model.moe.backend={backend}", *overrides])
        ds = load_ds_config(str(DS_CONFIGS / ds_file), cfg, device)
        model, mcfg = build_model(cfg, cfg.model.vocab_size)
        teacher, objective = build_teacher(cfg, mcfg, device)
    engine, optimizer, _ = build_engine(cfg, model, ds)
    taps = Taps(tap_points(engine.module, cfg.distill.positions, cfg.distill.include_embeddings))
    return cfg, mcfg, engine, optimizer, taps, teacher, objective, ds


def check_tcd_steps(device: torch.device, precision: str, backend: str = "torch", recipe: str = "small",
                    steps: int = 50, overrides: tuple[str, ...] = (), log: Callable[[str], None] = print
                    ) -> dict[str, Any]:
    """`steps` TCD steps in `precision` (bf16, fp16 or fp32: the matching ds_configs/ file for the
    device) through DeepSpeed; asserts finite loss terms, few skipped steps and falling losses."""
    from tcd_ds.train import TERMS, forward_loss

    ds_file = {("cuda", "bf16"): "gpu_zero2_bf16.json", ("cuda", "fp16"): "gpu_zero2_fp16.json",
               ("cpu", "bf16"): "cpu_zero2_bf16.json", ("cpu", "fp32"): "cpu_zero2.json"}[(device.type, precision)]
    overrides = ("train.warmup_steps=5", f"train.max_steps={steps}", "train.lr=1e-3", *overrides)
    cfg, mcfg, engine, optimizer, taps, teacher, objective, ds = _tcd_run(device, recipe, backend, ds_file, overrides)
    batches = _mlm_batches(cfg, 4, device)
    history, skipped = [], 0
    start = time.perf_counter()
    try:
        engine.train()
        for step in range(steps):
            optimizer.begin_step()
            loss, parts, _ = forward_loss(engine, batches[step % len(batches)], taps, teacher, objective)
            engine.backward(loss)
            engine.step()
            row = {k: float(parts[k]) for k in ("loss", *TERMS) if k in parts}
            bad = [k for k, v in row.items() if not math.isfinite(v)]
            assert not bad, f"TCD step {step + 1} in {precision} ({backend}): non-finite {', '.join(bad)}"
            if optimizer.skipped or getattr(engine.optimizer, "overflow", False):
                skipped += 1
            history.append(row)
        _sync(device)
    finally:
        taps.remove()
    seconds = time.perf_counter() - start
    first = {k: sum(h[k] for h in history[:10]) / 10 for k in history[0]}
    last = {k: sum(h[k] for h in history[-10:]) / 10 for k in history[0]}
    scale = getattr(engine.optimizer, "loss_scale", None) if precision == "fp16" else None
    log(f"tcd steps {precision} ({recipe}, backend {backend}, {ds_file}, teacher "
        f"{NAMES[next(teacher.parameters()).dtype]}): {steps} steps in {seconds:.1f} s, {skipped} skipped; "
        + ", ".join(f"{k} {first[k]:.4g} -> {last[k]:.4g}" for k in first)
        + (f"; loss scale {float(scale):g}" if scale is not None else ""))
    assert skipped < steps / 4, f"TCD in {precision} ({backend}): {skipped} of {steps} steps skipped"
    for k in ("loss", "mlm"):
        assert last[k] < first[k], (f"TCD in {precision} ({backend}): {k} did not fall over {steps} steps "
                                    f"(mean of the first 10 {first[k]:.4g}, of the last 10 {last[k]:.4g})")
    del engine, optimizer, teacher
    _release(device)
    return {"first": first, "last": last, "skipped": skipped, "seconds": seconds}


# --------------------------------------------------------------------------- 4. throughput, MFU

def measure_throughput(device: torch.device, recipe: str = "base", backend: str = "grouped",
                       ds_file: str = "gpu_zero2_bf16.json", overrides: tuple[str, ...] = (), warmup: int = 3,
                       repeats: int = 10, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tokens/s and MFU of the `moe` and `tcd` training steps (DeepSpeed engine, the trainer's
    `forward_loss`) of `recipe`, interleaved, median of `repeats`; MFU = the trainer's student
    FLOPs per token x tokens/s / this device's measured matmul peak in the training dtype."""
    from tcd_ds.bench.common import time_interleaved
    from tcd_ds.model.bert import flops_per_token, num_parameters
    from tcd_ds.monitor import measure_matmul_peak
    from tcd_ds.train import forward_loss

    t0 = time.perf_counter()
    cfg, mcfg, engine, optimizer, taps, teacher, objective, ds = _tcd_run(device, recipe, backend, ds_file, overrides)
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else (
        torch.float16 if ds.get("fp16", {}).get("enabled") else torch.float32)
    built = time.perf_counter() - t0
    batches = _mlm_batches(cfg, 2, device, ids_range=cfg.model.vocab_size)
    it = {"n": 0}

    def step(tcd: bool) -> None:
        it["n"] += 1
        optimizer.begin_step()
        loss, _, _ = forward_loss(engine, batches[it["n"] % 2], taps if tcd else None, teacher if tcd else None,
                                  objective if tcd else None)
        engine.backward(loss)
        engine.step()

    engine.train()
    try:
        stats = time_interleaved({"moe": lambda: step(False), "tcd": lambda: step(True)}, warmup=warmup,
                                 repeats=repeats, min_repeats=repeats, sync=lambda: _sync(device))
    finally:
        taps.remove()
    n = 8192 if device.type == "cuda" else 512
    peak = measure_matmul_peak(device, dtype, n=n, seconds=1.0 if device.type == "cuda" else 0.3)
    tokens = int(batches[0]["attention_mask"].sum())
    fpt = flops_per_token(mcfg, cfg.data.max_seq_len, cfg.data.mlm_probability)
    out: dict[str, Any] = {"recipe": recipe, "backend": backend, "ds_config": ds_file, "dtype": NAMES[dtype],
                           "parameters": num_parameters(engine.module), "tokens_per_step": tokens,
                           "matmul_peak_tflops": peak / 1e12, "peak_matmul_n": n, "build_s": built,
                           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    for name, st in stats.items():
        tps = tokens / (st["median_ms"] / 1e3)
        out[name] = {"median_ms": st["median_ms"], "tokens_per_second": tps, "mfu": fpt * tps / peak}
        log(f"throughput {recipe} ({mcfg.moe.num_experts} experts, {out['parameters'] / 1e6:,.1f}M parameters), "
            f"backend {backend}, {ds_file}: {name} step {st['median_ms']:.1f} ms, {tps:,.0f} tokens/s, MFU "
            f"{out[name]['mfu']:.1%} of the measured {NAMES[dtype]} matmul peak {peak / 1e12:.1f} TFLOP/s "
            f"({n}x{n})")
        assert math.isfinite(tps) and tps > 0
    return out


def _throughput_child(backend: str, plan: Plan, timeout_s: float, device: torch.device,
                      log: Callable[[str], None]) -> dict:
    """measure_throughput in a fresh process (its memory goes back with it); its log lines pass through."""
    cmd = [sys.executable, "-m", "tcd_ds.gpucheck", "--throughput", backend, "--recipe", plan.throughput_recipe,
           "--ds-config", plan.throughput_ds, "--warmup", str(plan.warmup), "--repeats", str(plan.repeats),
           *(f"--set={o}" for o in plan.throughput_overrides), *(["--cpu"] if device.type == "cpu" else [])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
        else:
            log(line)
    if proc.returncode or result is None:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise AssertionError(f"throughput ({backend}) exited with status {proc.returncode}:\n{tail}")
    return result


# --------------------------------------------------------------------------- the run

def run_all(device: torch.device, plan: Plan, deadline_s: float = 450.0, log: Callable[[str], None] = print
            ) -> tuple[dict[str, Any], list[str]]:
    """Every check of `plan` on `device`; returns (results, failures). A check that fails is listed and
    the others still run; throughput children are skipped once `deadline_s` has passed."""
    start = time.perf_counter()
    results: dict[str, Any] = {}
    failures: list[str] = []

    def attempt(name: str, fn: Callable[[], Any]) -> None:
        try:
            results[name] = fn()
        except Exception as err:  # noqa: BLE001 - reported, and the remaining checks still run
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            failures.append(f"{name}: {first}")
            log(f"FAIL {name}: {type(err).__name__}: {str(err).strip()}")
            if not isinstance(err, AssertionError):
                log("".join(traceback.format_exception(err)[-6:]).rstrip())

    with process_group(device):
        for dtype in plan.backend_dtypes:
            for k in (1, 2):
                attempt(f"backends/{NAMES[dtype]}/top{k}", lambda: check_backends(
                    device, dtype, plan.experts, plan.hidden, plan.ffn, plan.tokens, k, log=log))
        for dtype in plan.grouped_only_dtypes:  # grouped_mm's other dtypes (the fallback path on CUDA)
            attempt(f"backends/{NAMES[dtype]}/grouped", lambda: check_backends(
                device, dtype, plan.experts, plan.hidden, plan.ffn, plan.tokens, 1, ("grouped",), log=log))
        for dtype in plan.teacher_dtypes:
            attempt(f"teacher/{NAMES[dtype]}", lambda: check_teacher_dtypes(
                device, dtype, plan.teacher_recipe, plan.teacher_batch, log=log))
        avail = available_backends(device)
        for precision in plan.step_precisions:
            for backend, why_not in avail.items():
                if why_not or precision not in registry.get(backend).dtypes:
                    continue  # e.g. megablocks without bf16 is refused by load_ds_config
                attempt(f"tcd_steps/{precision}/{backend}", lambda: check_tcd_steps(
                    device, precision, backend, plan.step_recipe, plan.steps, plan.step_overrides, log=log))
    for backend in plan.throughput_backends:  # each in a child process: its memory goes back with it
        left = deadline_s - (time.perf_counter() - start)
        if left < 60:
            log(f"throughput ({backend}): skipped, the {deadline_s:.0f} s budget is spent")
            continue
        attempt(f"throughput/{backend}", lambda: _throughput_child(backend, plan, left, device, log))
    log(f"gpucheck: {len(results)} checks passed, {len(failures)} failed, in {time.perf_counter() - start:.0f} s")
    for f in failures:
        log(f"  failed: {f}")
    return results, failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tcd_ds.gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run the CPU plan even where a GPU is present")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--deadline-s", type=float, default=450.0, help="no throughput run starts after this")
    p.add_argument("--throughput", metavar="BACKEND", help=argparse.SUPPRESS)  # the child of run_all
    p.add_argument("--recipe", default="base", help=argparse.SUPPRESS)
    p.add_argument("--ds-config", default="gpu_zero2_bf16.json", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # config overrides
    args = p.parse_args(argv)
    from tcd_ds.monitor import quiet_known_warnings

    quiet_known_warnings()
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    if args.throughput:
        with process_group(device):
            res = measure_throughput(device, args.recipe, args.throughput, args.ds_config, tuple(args.set),
                                     args.warmup, args.repeats)
        print(RESULT_PREFIX + json.dumps(res), flush=True)
        return 0
    if gpu:
        print(f"gpucheck: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    elif args.cpu and torch.cuda.is_available():
        print("gpucheck: --cpu: running the CPU parts at small sizes, not the GPU checks", flush=True)
    else:
        print("gpucheck: no GPU here (torch.cuda.is_available() is False): the GPU checks are not run; "
              "running their CPU parts at small sizes", flush=True)

    def log(line: str) -> None:
        print(line, flush=True)

    results, failures = run_all(device, GPU_PLAN if gpu else CPU_PLAN, args.deadline_s, log)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "results": results, "failures": failures},
                                              indent=2, default=str) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
