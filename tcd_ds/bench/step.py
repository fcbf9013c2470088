"""Benchmark: one training step of `vanilla`, `moe` and `tcd` at the tiny and small recipes.

Built with the trainer's own pieces (`tcd_ds.train`): `build_model` for the vanilla model and the
MoE student, `build_teacher` for the frozen teacher (the recipe's vanilla model saved to a temporary
directory and loaded back the way `teacher.path` is) and the objective, `Taps(tap_points(...))`,
and `forward_loss` for the forward of every mode. The step is `forward_loss` + `backward` + gradient
clipping (`train.grad_clip`, as DeepSpeed's `gradient_clipping`) + a plain `torch.optim.AdamW` step
over the trainer's `param_groups` + `zero_grad`: no DeepSpeed engine (no ZeRO partitioning, no
engine hooks), fp32, one process.

Variants (one recipe's variants interleaved in this process; median over repeats after warm-up):
- `vanilla`: the dense model (MLM only);
- `moe`: the MoE student (MLM + load balancing);
- `tcd`: the same MoE student with taps armed, the teacher forward and the relation losses;
- `tcd_teacher_only`: the same, but the teacher forward alone (no taps, no relation losses): the
  difference `tcd - tcd_teacher_only` is the cost of the taps and relation losses.
`moe`, `tcd` and `tcd_teacher_only` step the same model instance (same weights, one optimizer).

Batches: full-length sequences (the trainer packs its corpus into full sequences) of random ids,
masked by the trainer's `mask_tokens` (15 %); tokens per step are the non-padding tokens, as the
trainer counts them. MFU is the trainer's: `flops_per_token` of the student model (top-k experts,
MLM head on the masked fraction; the teacher and the relation losses are not counted) times
tokens/s over this machine's matmul peak, measured in the same run by `measure_matmul_peak`
(before and after the timed steps; the larger is used).
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from tcd_ds.bench.common import md_table, target, time_interleaved

VARIANTS = ("vanilla", "moe", "tcd", "tcd_teacher_only")
FULL = {"recipes": ("tiny", "small"), "warmup": {"tiny": 2, "small": 2, "base": 1},
        "repeats": {"tiny": 15, "small": 7, "base": 3},
        "budget_s": {"tiny": 30.0, "small": 90.0, "base": 400.0}}
QUICK = {"recipes": ("tiny",), "warmup": {"tiny": 1}, "repeats": {"tiny": 2}, "budget_s": {"tiny": 5.0}}
# base at 64 experts has 3.68B parameters: fp32 weights + gradients + AdamW states ~55 GiB, more than a
# 24 GB machine holds; it is measured (only when asked for) with 2 experts (0.17B parameters, ~2.6 GiB
# with gradients and AdamW states), micro-batch 8, and without the vanilla variant (its model and
# optimizer are another 1.6 GiB; the teacher is still the recipe's vanilla model). Top-1 keeps the
# active FLOPs of 64 experts; fewer experts shrink only the optimizer step, which TCD does not add to,
# so the TCD/MoE ratio measured this way is if anything high.
RECIPE_OVERRIDES = {"base": ["model.moe.num_experts=2", "train.micro_batch_size=8"]}
SKIP_VARIANTS = {"base": {"vanilla"}}
QUICK_OVERRIDES = ["train.micro_batch_size=4"]


def _batches(cfg, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    from tcd_ds.data.mlm import mask_tokens
    from tcd_ds.data.tokenizer import SpecialIds

    vocab, b, s = cfg.model.vocab_size, cfg.train.micro_batch_size, cfg.data.max_seq_len
    special = SpecialIds(pad=0, unk=100, cls=101, sep=102, mask=103, vocab_size=vocab)  # BERT uncased ids
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(999, vocab, (b, s), generator=gen)
        ids[:, 0], ids[:, -1] = special.cls, special.sep
        mask = torch.ones(b, s, dtype=torch.long)
        masked, labels = mask_tokens(ids, mask, special, vocab, gen, cfg.data.mlm_probability)
        out.append({"input_ids": masked, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                    "labels": labels})
    return out


class _Trainer:
    """One model + its AdamW; `step(batch, taps, teacher, objective)` is one full training step."""

    def __init__(self, model: torch.nn.Module, cfg):
        from tcd_ds.optim import param_groups

        t = cfg.train
        self.model, self.clip = model.train(), t.grad_clip
        self.opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                     eps=t.eps)

    def step(self, batch, taps=None, teacher=None, objective=None, teacher_only=None) -> None:
        from tcd_ds.train import forward_loss

        loss, _, _ = forward_loss(self.model, batch, taps, teacher, objective)
        if teacher_only is not None:  # the teacher forward alone, its result unused
            teacher_only(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _build_models(recipe: str, overrides: Sequence[str], device: torch.device):
    """The recipe's vanilla model, its MoE student and, as the student's teacher, that vanilla model
    saved and loaded back (with the relation objective)."""
    from tcd_ds.config import build_config
    from tcd_ds.model.hf import save_pretrained
    from tcd_ds.train import build_model, build_teacher

    with tempfile.TemporaryDirectory(prefix="tcd-bench-teacher-") as tmp:
        cfg_v = build_config(recipe, ["mode=vanilla", *overrides])
        vanilla, vcfg = build_model(cfg_v, cfg_v.model.vocab_size)
        save_pretrained(vanilla, vcfg, Path(tmp))  # the teacher: this recipe's vanilla model
        cfg = build_config(recipe, ["mode=tcd", f"teacher.path={tmp}", *overrides])
        student, scfg = build_model(cfg, cfg.model.vocab_size)
        teacher, objective = build_teacher(cfg, scfg, device)
    return cfg_v, vanilla, vcfg, cfg, student, scfg, teacher, objective


def _rows(recipe: str, names: Sequence[str], stats: dict, cfg, model_cfgs: dict, tokens: int,
          peak: float) -> list[dict[str, Any]]:
    """One table row per variant: time, tokens/s, MFU (the variant's model FLOPs over `peak`), x moe."""
    from tcd_ds.model.bert import flops_per_token

    seq, b = cfg.data.max_seq_len, cfg.train.micro_batch_size
    rows = []
    for name in names:
        st = stats[name]
        tps = tokens / (st["median_ms"] / 1e3)
        fpt = flops_per_token(model_cfgs["vanilla" if name == "vanilla" else "moe"], seq, cfg.data.mlm_probability)
        rows.append({"recipe": recipe, "variant": name, "batch": b, "seq_len": seq, "tokens_per_step": tokens,
                     "median_ms": st["median_ms"], "min_ms": st["min_ms"], "repeats": st["repeats"],
                     "tokens_per_second": tps, "mfu": fpt * tps / peak,
                     "x_moe": st["median_ms"] / stats["moe"]["median_ms"]})
    return rows


def _variant_steps(van, moe, batches: list, taps, teacher, objective, skip) -> dict[str, Any]:
    """One training step per variant (vanilla, moe, tcd, tcd_teacher_only), cycling over `batches`."""
    it = {"n": 0}

    def batch():
        it["n"] += 1
        return batches[it["n"] % len(batches)]

    fns = {
        "vanilla": lambda: van.step(batch()),
        "moe": lambda: moe.step(batch()),
        "tcd": lambda: moe.step(batch(), taps, teacher, objective),
        "tcd_teacher_only": lambda: moe.step(batch(), teacher_only=teacher),
    }
    return {k: v for k, v in fns.items() if k not in skip}


def bench_recipe(recipe: str, quick: bool, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Time the four variants of one recipe; returns {"rows": [...], "info": {...}}."""
    from tcd_ds.distill.taps import Taps, tap_points
    from tcd_ds.model.bert import num_parameters
    from tcd_ds.monitor import measure_matmul_peak

    cfg_all = QUICK if quick else FULL
    device = torch.device("cpu")
    overrides = [*RECIPE_OVERRIDES.get(recipe, []), *(QUICK_OVERRIDES if quick else []), *overrides]
    peaks = [measure_matmul_peak(device, torch.float32)]
    cfg_v, vanilla, vcfg, cfg, student, scfg, teacher, objective = _build_models(recipe, overrides, device)
    taps = Taps(tap_points(student, cfg.distill.positions, cfg.distill.include_embeddings))
    skip = SKIP_VARIANTS.get(recipe, set()) if not quick else set()
    vanilla_params = num_parameters(vanilla)
    if "vanilla" in skip:
        del vanilla
        van = None
    else:
        van = _Trainer(vanilla, cfg_v)
    moe = _Trainer(student, cfg)
    batches = _batches(cfg, 3)
    fns = _variant_steps(van, moe, batches, taps, teacher, objective, skip)
    stats = time_interleaved(fns, warmup=cfg_all["warmup"].get(recipe, 1), repeats=cfg_all["repeats"].get(recipe, 3),
                             budget_s=cfg_all["budget_s"].get(recipe, 60.0), min_repeats=2)
    taps.remove()
    peaks.append(measure_matmul_peak(device, torch.float32))
    peak = max(peaks)
    tokens = int(batches[0]["attention_mask"].sum())
    masked = int((batches[0]["labels"] != -100).sum())
    rows = _rows(recipe, [v for v in VARIANTS if v not in skip], stats, cfg, {"vanilla": vcfg, "moe": scfg}, tokens,
                 peak)
    tcd, only = stats["tcd"]["median_ms"], stats["tcd_teacher_only"]["median_ms"]
    flops = _flop_budget(cfg, scfg, teacher, tokens)
    info = {
        "recipe": recipe, "overrides": overrides, "matmul_peak_gflops": [p / 1e9 for p in peaks],
        "skipped_variants": sorted(skip),
        "parameters": {"vanilla": vanilla_params, "moe": num_parameters(student),
                       "moe_active": num_parameters(student, active=True)},
        "masked_tokens_per_step": masked, "tap_pairs": len(tap_points(student, cfg.distill.positions,
                                                                       cfg.distill.include_embeddings)),
        "teacher_layers_run": teacher.num_layers,
        "tcd_over_moe": tcd / stats["moe"]["median_ms"], "tcd_ms": tcd,
        "tcd_over_moe_min": stats["tcd"]["min_ms"] / stats["moe"]["min_ms"],
        "relation_and_taps_share_min": (stats["tcd"]["min_ms"] - stats["tcd_teacher_only"]["min_ms"])
        / stats["tcd"]["min_ms"],
        "relation_and_taps_ms": tcd - only, "relation_and_taps_share": (tcd - only) / tcd,
        "teacher_forward_ms": only - stats["moe"]["median_ms"],
        **flops, "relation_gflops_per_s": flops["relation_gflop"] / max(tcd - only, 1e-9) * 1e3,
        "student_gflops_per_s": flops["student_gflop"] / stats["moe"]["median_ms"] * 1e3,
        "model": {k: v for k, v in dataclasses.asdict(scfg).items() if k != "moe"} | {"moe": dataclasses.asdict(scfg.moe)},
    }
    return {"rows": rows, "info": info}


def _flop_budget(cfg, scfg, teacher, tokens: int) -> dict[str, float]:
    """GFLOP per step of the student (training, as the trainer's MFU counts it), of the teacher's
    forward, and of the relation losses (forward + backward of the batched products that
    tcd_ds.distill.relation runs: naive 6 L^2 D, Gram 10 L D^2 per sequence)."""
    from tcd_ds.distill.relation import choose_impl
    from tcd_ds.model.bert import flops_per_token

    b, seq = cfg.train.micro_batch_size, cfg.data.max_seq_len
    student = flops_per_token(scfg, seq, cfg.data.mlm_probability) * tokens
    t = teacher.config
    per_layer = 4 * t.hidden_size ** 2 + 2 * seq * t.hidden_size + 2 * t.hidden_size * t.intermediate_size
    teacher_f = 2 * per_layer * teacher.num_layers * tokens
    rel = 0.0
    positions = cfg.distill.positions
    layers = scfg.num_layers
    pairs = []  # (count, sequences, feature dim)
    if "T" in positions:
        pairs.append((layers + int(cfg.distill.include_embeddings), b, scfg.hidden_size))
    if "I" in positions:
        pairs.append((2 * layers, b, scfg.hidden_size))
    if "A" in positions:
        pairs.append((3 * layers, b * scfg.num_heads, scfg.head_dim))
    for count, seqs, d in pairs:
        impl = choose_impl(cfg.distill.form, d, d, seq, cfg.distill.impl)
        rel += count * seqs * (6 * seq * seq * d if impl == "naive" else 10 * seq * d * d)
    total = student + teacher_f + rel
    return {"student_gflop": student / 1e9, "teacher_gflop": teacher_f / 1e9, "relation_gflop": rel / 1e9,
            "relation_flop_share": rel / total, "tcd_over_moe_flops": total / student}


def format_table(rows: list[dict[str, Any]]) -> str:
    return md_table(["recipe", "variant", "batch x seq", "median ms", "min ms", "tokens/s", "MFU", "x moe"],
                    [[r["recipe"], r["variant"], f"{r['batch']} x {r['seq_len']}", r["median_ms"], r["min_ms"],
                      r["tokens_per_second"], r["mfu"], r["x_moe"]] for r in rows], align="llrrrrrr")


def targets(infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for info in infos:
        r = info["recipe"]
        flop_note = (f"FLOPs per step: student {info['student_gflop']:.1f} G (training), teacher forward "
                     f"{info['teacher_gflop']:.1f} G, relation losses {info['relation_gflop']:.1f} G of fp32 batched "
                     f"matmuls (no cheaper exact form: naive 6 L^2 D, Gram 10 L D^2 per sequence and tap)")
        if r in ("small", "base"):
            out.append(target(f"TCD / MoE step time, {r}" + (" (" + ", ".join(info["overrides"]) + ")"
                                                               if info["overrides"] else ""),
                              info["tcd_over_moe"], 1.30 if r == "small" else 1.40, "<=",
                              value_min=info["tcd_over_moe_min"],
                              bound=f"{flop_note}: TCD adds {100 * (info['tcd_over_moe_flops'] - 1):.0f} % to the "
                                    "student's FLOPs"))
        if r == "small":
            out.append(target("relation losses + taps share of the TCD step, small", info["relation_and_taps_share"],
                              0.05, "<=", value_min=info["relation_and_taps_share_min"],
                              bound=f"{flop_note}: {100 * info['relation_flop_share']:.0f} % of the TCD step's FLOPs; "
                                    f"even at this machine's matmul peak ({max(info['matmul_peak_gflops']):.0f} GFLOP/s, "
                                    "measured in the same run) they take "
                                    f"{info['relation_gflop'] / max(info['matmul_peak_gflops']) * 1e3:.0f} ms = "
                                    f"{100 * info['relation_gflop'] / max(info['matmul_peak_gflops']) * 1e3 / info['tcd_ms']:.0f}"
                                    " % of the measured TCD step (measured: "
                                    f"{info['relation_gflops_per_s']:.0f} GFLOP/s for relation losses + taps)"))
    return out


def section(quick: bool = False, threads: int | None = None, recipes: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = QUICK if quick else FULL
    rows, infos = [], []
    for recipe in recipes or cfg["recipes"]:
        res = bench_recipe(recipe, quick)
        rows += res["rows"]
        infos.append(res["info"])
    notes = [
        "one full training step: the trainer's `forward_loss` (student forward, and for tcd the taps, the "
        "teacher forward and the relation losses) + backward + grad clipping + torch AdamW step + zero_grad; "
        "plain torch, no DeepSpeed engine, fp32, one process.",
        "`moe`, `tcd`, `tcd_teacher_only` step one shared MoE student; the four variants of a recipe are "
        "interleaved, warm-up steps first ("
        + ", ".join(f"{r} {n}" for r, n in cfg["warmup"].items() if r in (recipes or cfg["recipes"]))
        + "), then the median of the repeats (" + ", ".join(f"{r} up to {n}" for r, n in cfg["repeats"].items()
                                                          if r in (recipes or cfg["recipes"])) + ").",
        "MFU: the trainer's definition (student FLOPs only: top-k experts, MLM head on the masked 15 %) over "
        "this machine's matmul peak measured in the same run.",
    ]
    for info in infos:
        notes.append(
            f"{info['recipe']}: TCD/MoE = {info['tcd_over_moe']:.3f}; relation losses + taps "
            f"{info['relation_and_taps_ms']:.1f} ms = {100 * info['relation_and_taps_share']:.1f} % of the TCD step; "
            f"teacher forward {info['teacher_forward_ms']:.1f} ms ({info['teacher_layers_run']} layers, no MLM head); "
            f"{info['tap_pairs']} tap pairs; matmul peak "
            + "/".join(f"{p:.1f}" for p in info["matmul_peak_gflops"]) + " GFLOP/s (before/after)"
            + (f"; overrides {' '.join(info['overrides'])}" if info["overrides"] else "")
            + (f"; not run here (memory): {', '.join(info['skipped_variants'])}" if info["skipped_variants"] else ""))
    return {"name": "step", "title": "Training step: vanilla vs MoE vs TCD", "rows": rows, "info": infos,
            "table": format_table(rows), "notes": notes, "targets": targets(infos),
            "params": {"recipes": list(recipes or cfg["recipes"]), "warmup": cfg["warmup"]}}

