"""Benchmark: one MoE FFN layer forward+backward per backend, against a dense FFN of the same active size.

Backends (those of `tcd_ds/model/experts/registry.py`): `torch` (reference: tokens sorted by expert, a
loop over experts), `grouped` (`grouped_mm`), `deepspeed` (`deepspeed.moe.layer.MoE` in a world-of-one gloo group with
`ep_size=1`) and `megablocks` (NVIDIA GPUs only: skipped, with the reason, elsewhere). Top-1,
dropless, 8 and 64 experts; the dense FFN is `Intermediate` + `ResidualOutput.dense` of the model
(H -> F -> H, the same FLOPs as one expert per token). Every MoE variant holds the same canonical
weights. Timed: `y, stats = layer(x); ((y * g).sum() + stats.loss).backward()` (router, dispatch,
experts, combine and router losses included), all variants of one shape interleaved in this process,
median over repeats after warm-up.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch

from tcd_ds.bench.common import md_table, target, time_interleaved
from tcd_ds.model.experts import registry

# shape name -> (hidden, intermediate, batch, seq)
FULL = {"shapes": {"small (H=128, F=512)": (128, 512, 32, 128), "base (H=768, F=3072)": (768, 3072, 8, 128)},
        "experts": (8, 64), "warmup": 3, "repeats": 31, "budget_s": 30.0}
QUICK = {"shapes": {"quick (H=32, F=64)": (32, 64, 4, 32)}, "experts": (8, 64), "warmup": 1, "repeats": 3,
         "budget_s": 1.0}
BACKENDS = registry.names()


class _WorldOfOne:
    """A gloo process group of one with DeepSpeed's ep_size=1 expert groups (torn down if we made it)."""

    def __enter__(self):
        import torch.distributed as td

        from tcd_ds.model.experts.expert_parallel import ensure_expert_groups

        self.owned = not td.is_initialized()
        if self.owned:
            from tcd_ds.dist import free_port

            td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                  timeout=timedelta(seconds=120))
        ensure_expert_groups(1)
        return self

    def __exit__(self, *exc):
        if self.owned:
            import deepspeed.comm as ds_comm

            ds_comm.destroy_process_group()  # also drops DeepSpeed's cached expert groups


def _layers(hidden: int, inter: int, experts: int) -> tuple[dict[str, Any], dict[str, str]]:
    """Dense FFN and every available backend (same canonical weights); reasons for the skipped ones."""
    from torch import nn

    from tcd_ds.config import ModelConfig, MoEConfig
    from tcd_ds.model.bert import Intermediate
    from tcd_ds.model.moe import build_moe

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=hidden, num_heads=1, intermediate_size=inter, hidden_dropout=0.0)

    class DenseFFN(nn.Module):  # the model's dense FFN: Intermediate (dense + gelu) then output.dense
        def __init__(self):
            super().__init__()
            self.intermediate, self.dense = Intermediate(cfg), nn.Linear(inter, hidden)
            for m in (self.intermediate.dense, self.dense):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

        def forward(self, x):
            return self.dense(self.intermediate(x)), None

    layers: dict[str, Any] = {"dense": DenseFFN()}
    skipped: dict[str, str] = {}
    ref_sd = None
    for backend in BACKENDS:
        mcfg = ModelConfig(hidden_size=hidden, num_heads=1, intermediate_size=inter,
                           moe=MoEConfig(num_experts=experts, top_k=1, backend=backend))
        try:
            layer = build_moe(mcfg)
        except Exception as err:  # noqa: BLE001 - reported as the skip reason
            skipped[backend] = str(err).splitlines()[0]
            continue
        if backend == "torch":
            layer.reset_expert_parameters(0.02)
            ref_sd = {"router.weight": layer.router.weight.detach(),
                      **{f"experts.{k}": getattr(layer.experts, k).detach() for k in ("w1", "b1", "w2", "b2")}}
        elif hasattr(layer, "load_canonical_state_dict"):
            layer.load_canonical_state_dict(ref_sd)
        else:  # its parameters are the canonical ones (grouped)
            layer.load_state_dict(ref_sd)
        layers[backend] = layer.train()
    return layers, skipped


def _step(layer, x: torch.Tensor, g: torch.Tensor):
    def step() -> None:
        y, stats = layer(x)
        loss = (y * g).sum()
        if stats is not None:
            loss = loss + stats.loss
        loss.backward()
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    return step


def run(quick: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    cfg = QUICK if quick else FULL
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with _WorldOfOne():
        for shape, (hidden, inter, batch, seq) in cfg["shapes"].items():
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(batch, seq, hidden, generator=gen).requires_grad_(True)
            g = torch.randn(batch, seq, hidden, generator=gen)
            for experts in cfg["experts"]:
                layers, skipped = _layers(hidden, inter, experts)
                fns = {name: _step(layer, x, g) for name, layer in layers.items()}
                stats = time_interleaved(fns, warmup=cfg["warmup"], repeats=cfg["repeats"], budget_s=cfg["budget_s"])
                dense_ms = stats["dense"]["median_ms"]
                load = None
                if "torch" in layers:
                    with torch.no_grad():
                        counts = layers["torch"](x)[1].counts
                    load = float(counts.max()) / (float(counts.sum()) / experts)
                for name in ("dense", *BACKENDS):
                    row = {"shape": shape, "hidden": hidden, "intermediate": inter, "tokens": batch * seq,
                           "case_experts": experts, "experts": 1 if name == "dense" else experts, "variant": name, "status": "ok",
                           "median_ms": None, "min_ms": None, "repeats": 0, "x_dense": None, "skip_reason": None,
                           "max_load_over_mean": None if name == "dense" else load}
                    if name in stats:
                        row.update(median_ms=stats[name]["median_ms"], min_ms=stats[name]["min_ms"],
                                   repeats=stats[name]["repeats"], x_dense=stats[name]["median_ms"] / dense_ms)
                    else:
                        row["status"], row["skip_reason"] = "skipped", skipped.get(name, "not built")
                    rows.append(row)
    for name in BACKENDS:
        reason = next((r["skip_reason"] for r in rows if r["variant"] == name and r["skip_reason"]), None)
        if reason:
            notes.append(f"{name}: skipped on this machine: {reason}")
    return rows, notes


def format_table(rows: list[dict[str, Any]]) -> str:
    return md_table(
        ["shape", "tokens", "experts", "variant", "median ms", "min ms", "x dense", "max/mean expert load", "status"],
        [[r["shape"], r["tokens"], r["experts"], r["variant"], r["median_ms"], r["min_ms"], r["x_dense"],
          r["max_load_over_mean"], r["status"]] for r in rows], align="lrrlrrrrl")


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r["experts"] == 64 and r["variant"] in ("torch", "grouped") and r["shape"].startswith("small") \
                and r["status"] == "ok":
            dense = next(d for d in rows if d["variant"] == "dense" and d["shape"] == r["shape"]
                         and d["case_experts"] == r["case_experts"])
            out.append(target(
                f"MoE {r['variant']} backend, 64 experts top-1, {r['shape']}: time / dense FFN time", r["x_dense"], 1.5,
                "<=", value_min=r["min_ms"] / dense["min_ms"],
                bound="64 small GEMMs (~64 tokens each) per projection instead of one, and every expert's weights "
                      "read and their gradients written each step (64 x 0.5 MB per layer and pass): the experts alone "
                      "run at ~1.2x the dense FFN here; router, sort, gather and weighted combine add ~5 ms"))
    return out


def section(quick: bool = False, threads: int | None = None) -> dict[str, Any]:
    cfg = QUICK if quick else FULL
    rows, notes = run(quick)
    notes = [
        "fwd+bwd of one FFN layer on [batch*seq, H] tokens, fp32, top-1, dropless; dense = H -> F -> H with "
        f"the same active FLOPs; variants of one (shape, experts) interleaved, {cfg['warmup']} warm-up calls, "
        f"median of up to {cfg['repeats']} repeats. The dense row is re-timed with each expert count.",
        "router at init (std 0.02): near-uniform load; `max/mean expert load` is the busiest expert's tokens "
        "over the mean.",
        "deepspeed: deepspeed.moe.layer.MoE, world-of-one gloo group, ep_size 1 (its dispatch pads every "
        "expert to the largest load and runs einsum-based dispatch/combine).",
        "with few tokens per expert the step is bound by the expert weights, not the tokens: every expert's "
        "w1/w2 are read in the forward and backward and their gradients written, E x 2 x H x F x 4 B each time "
        "(base shape, 64 experts: 1.2 GB per pass for 1024 tokens, ~16 per expert), against H x F-sized "
        "weights for the dense FFN.",
        *notes,
    ]
    return {"name": "moe", "title": "MoE layer forward+backward per backend vs dense FFN", "rows": rows,
            "table": format_table(rows), "notes": notes, "targets": targets(rows),
            "params": {"shapes": {k: list(v) for k, v in cfg["shapes"].items()}, "experts": list(cfg["experts"]),
                       "warmup": cfg["warmup"], "repeats": cfg["repeats"]}}


