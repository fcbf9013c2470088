"""Benchmark: tcd-ds `vanilla` vs `transformers.BertForMaskedLM`, one full training step each.

Same shapes (4 layers; hidden 128 / 2 heads, seq 128, batch 32; hidden 256 / 4 heads, seq 128,
batch 16; FFN 4 x hidden; vocab 30522), same batch (full-length sequences, 15 % masked by the
trainer's `mask_tokens`), fp32, dropout 0.1 in both, `torch.optim.AdamW` (lr 1e-4), and the step is
forward with labels + backward + optimizer step + zero_grad. transformers runs its default attention
(SDPA) and, like every Hugging Face MLM, the prediction head on every position; tcd-ds runs it on the
masked positions only (`masked_only=True`, the trainer's default) -- checked here by counting the rows
that reach the head. The two models of one shape are interleaved in this process; median over repeats
after warm-up.
"""
from __future__ import annotations

from typing import Any

import torch

from tcd_ds.bench.common import md_table, target, time_interleaved

# name -> (layers, hidden, heads, seq, batch)
FULL = {"shapes": {"L=4 H=128": (4, 128, 2, 128, 32), "L=4 H=256": (4, 256, 4, 128, 16)}, "warmup": 2,
        "repeats": 9, "budget_s": 60.0}
QUICK = {"shapes": {"L=2 H=64 (quick)": (2, 64, 2, 32, 8)}, "warmup": 1, "repeats": 2, "budget_s": 5.0}
VOCAB = 30522


def _batch(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from tcd_ds.data.mlm import mask_tokens
    from tcd_ds.data.tokenizer import SpecialIds

    special = SpecialIds(pad=0, unk=100, cls=101, sep=102, mask=103, vocab_size=VOCAB)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(999, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    masked, labels = mask_tokens(ids, mask, special, VOCAB, gen, 0.15)
    return {"input_ids": masked, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}


def _models(layers: int, hidden: int, heads: int):
    import transformers

    from tcd_ds.config import ModelConfig
    from tcd_ds.model.bert import BertForMaskedLM

    torch.manual_seed(0)
    ours = BertForMaskedLM(ModelConfig(vocab_size=VOCAB, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                       intermediate_size=4 * hidden, max_position=512)).train()
    hf_cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * hidden,
                                     max_position_embeddings=512)
    hf = transformers.BertForMaskedLM(hf_cfg).train()
    return ours, hf


def _head_rows(module: torch.nn.Module) -> tuple[dict, Any]:
    seen = {"rows": []}

    def hook(mod, args):
        x = args[0]
        seen["rows"].append(x.numel() // x.shape[-1])

    return seen, module.register_forward_pre_hook(hook)


def run(quick: bool = False) -> list[dict[str, Any]]:
    cfg = QUICK if quick else FULL
    rows = []
    for shape, (layers, hidden, heads, seq, batch) in cfg["shapes"].items():
        ours, hf = _models(layers, hidden, heads)
        b = _batch(batch, seq)
        opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
        opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)

        def step_ours():
            out = ours(b["input_ids"], b["attention_mask"], b["token_type_ids"], labels=b["labels"])
            out.loss.backward()
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)

        def step_hf():
            out = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
                     labels=b["labels"])
            out.loss.backward()
            opt_hf.step()
            opt_hf.zero_grad(set_to_none=True)

        seen_ours, h1 = _head_rows(ours.cls)
        seen_hf, h2 = _head_rows(hf.cls)
        stats = time_interleaved({"tcd-ds vanilla": step_ours, "transformers BertForMaskedLM": step_hf},
                                 warmup=cfg["warmup"], repeats=cfg["repeats"], budget_s=cfg["budget_s"], min_repeats=2)
        h1.remove()
        h2.remove()
        tokens, masked = batch * seq, int((b["labels"] != -100).sum())
        peer_ms = stats["transformers BertForMaskedLM"]["median_ms"]
        for name, seen in (("tcd-ds vanilla", seen_ours), ("transformers BertForMaskedLM", seen_hf)):
            st = stats[name]
            rows.append({"shape": shape, "layers": layers, "hidden": hidden, "heads": heads, "seq_len": seq,
                         "batch": batch, "variant": name, "median_ms": st["median_ms"], "min_ms": st["min_ms"],
                         "repeats": st["repeats"], "tokens_per_second": tokens / (st["median_ms"] / 1e3),
                         "x_transformers": peer_ms / st["median_ms"], "head_rows": seen["rows"][-1],
                         "masked_tokens": masked, "attn": getattr(hf.config, "_attn_implementation", None)
                         if name.startswith("transformers") else "sdpa"})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    return md_table(["shape", "batch x seq", "variant", "median ms", "min ms", "tokens/s", "speed x transformers",
                     "rows into the MLM head (masked)"],
                    [[r["shape"], f"{r['batch']} x {r['seq_len']}", r["variant"], r["median_ms"], r["min_ms"],
                      r["tokens_per_second"], r["x_transformers"], f"{r['head_rows']} ({r['masked_tokens']})"]
                     for r in rows], align="lllrrrrr")


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r["variant"] == "tcd-ds vanilla" and r["hidden"] == 128:
            peer = next(p for p in rows if p["shape"] == r["shape"] and p["variant"] != r["variant"])
            out.append(target(f"tcd-ds vanilla / transformers tokens/s, {r['shape']}, batch {r['batch']}",
                              r["x_transformers"], 3.0, ">=", value_min=peer["min_ms"] / r["min_ms"]))
    return out


def section(quick: bool = False, threads: int | None = None) -> dict[str, Any]:
    cfg = QUICK if quick else FULL
    rows = run(quick)
    notes = [
        "full training step (forward with labels, backward, torch AdamW step, zero_grad), fp32, dropout 0.1, "
        f"vocab {VOCAB}, FFN 4 x hidden, full-length sequences with 15 % masked; the two models of a shape "
        f"interleaved, {cfg['warmup']} warm-up steps each, median of up to {cfg['repeats']} repeats.",
        "rows into the MLM head: tcd-ds gathers the masked positions before the head (batch x seq x 15 %); "
        "transformers projects every position onto the 30522-word vocabulary.",
    ]
    return {"name": "peer", "title": "Peer: tcd-ds vanilla vs transformers.BertForMaskedLM", "rows": rows,
            "table": format_table(rows), "notes": notes, "targets": targets(rows),
            "params": {"shapes": {k: list(v) for k, v in cfg["shapes"].items()}, "warmup": cfg["warmup"],
                       "repeats": cfg["repeats"]}}
