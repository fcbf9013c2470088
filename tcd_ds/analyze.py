"""How close a model's token relations are to a teacher's, per layer and position, on held-out text.

    python -m tcd_ds.analyze <model> --teacher <model> --corpus <text file or dir> [--out analysis.json]

`<model>` and `--teacher`: a tcd-ds run dir, its `export/`, or a Hugging Face BERT directory (dense
or, for the model, MoE). Both read the same sequences of `--corpus`, tokenised with the model's
vocab (the teacher must share it). For every TCD position (T: embeddings and layer outputs; I: the
attention and FFN outputs before the residual add; A: per-head Q, K, V) of every layer it reports:

- `relation`: TCD's relation loss between the model's and the teacher's token-to-token cosine
  similarity matrices (the same function and layer map the trainer uses, `distill.form=mse`), the
  mean over sequences;
- `cka`: linear CKA (Kornblith et al. 2019) between the two models' representations of the same
  tokens, for T and I ([tokens, hidden] matrices, centred; 1 = the same up to rotation and scale).
  A is compared per head through the relation loss only.

The model runs in eval mode (no dropout; MoE routing as at evaluation). Sequences are
`[CLS] ... [SEP]` windows of `--seq-len` tokens, as pre-training packs them; `--sequences` caps them.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from tcd_ds.config import ModelConfig
from tcd_ds.distill.relation import relation_losses, uniform_layer_map
from tcd_ds.distill.taps import Key, Taps, tap_points
from tcd_ds.model.bert import BertModel
from tcd_ds.model.hf import CheckpointError, load_hf_state_dict, read_pretrained

POSITIONS = "TIA"


def model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    return path / "export" if (path / "export" / "config.json").is_file() else path


def load_encoder(path: str | Path) -> tuple[BertModel, ModelConfig, Path]:
    """The encoder of a dense or MoE model directory, fp32, eval mode, MoE on the torch backend."""
    directory = model_dir(path)
    cfg, sd = read_pretrained(directory)
    cfg.hidden_dropout = cfg.attention_dropout = 0.0
    cfg.moe.backend, cfg.moe.ep_size = "torch", 1
    encoder = BertModel(cfg)
    load_hf_state_dict(encoder, {k: v.float() for k, v in sd.items()})
    return encoder.eval().requires_grad_(False), cfg, directory


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of [n, d1] and [n, d2] (rows = the same examples), in float64."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).square().sum()
    return float(cross / ((x.T @ x).square().sum().sqrt() * (y.T @ y).square().sum().sqrt()))


def _name(key: Key) -> str:
    position, layer, name = key
    return f"{position}/{layer}" + ("" if name == "out" else f"/{name}")


def _load_pair(model_path: str, teacher_path: str, seq_len: int):
    """The model and the teacher (encoders, configs, dirs) and the model's vocab, refused with one line
    where they cannot be compared: an MoE teacher, different vocabularies, too long a seq_len."""
    model, cfg, mdir = load_encoder(model_path)
    teacher, tcfg, tdir = load_encoder(teacher_path)
    if tcfg.moe.num_experts:
        raise CheckpointError(f"the teacher at {teacher_path} is an MoE model; TCD's teacher is a vanilla BERT")
    if tcfg.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"teacher vocab_size {tcfg.vocab_size} != model vocab_size {cfg.vocab_size}: "
                              "they must share the tokenizer")
    vocab = mdir / "vocab.txt"
    if not vocab.is_file():
        raise FileNotFoundError(f"{mdir} has no vocab.txt (the tokenizer the model was trained with)")
    if seq_len > min(cfg.max_position, tcfg.max_position):
        raise ValueError(f"--seq-len {seq_len} exceeds the models' max_position")
    return model, cfg, mdir, teacher, tcfg, tdir, vocab


def _summarize(sums: dict, counts: dict, feats: dict, layer_map: list[int], positions: str):
    """Per tap: the mean relation loss over sequences and the CKA of the kept tokens; per position:
    their means over layers (and taps)."""
    per_key = {}
    for name in sums:
        position, layer = name.split("/")[0], int(name.split("/")[1])
        entry = {"position": position, "layer": layer, "teacher_layer": layer_map[layer],
                 "relation": sums[name] / counts[name]}
        if name in feats:
            entry["cka"] = linear_cka(torch.cat(feats[name][0]), torch.cat(feats[name][1]))
        per_key[name] = entry
    summary = {}
    for position in positions:
        vals = [e for e in per_key.values() if e["position"] == position]
        summary[position] = {"relation": float(np.mean([e["relation"] for e in vals]))}
        if position != "A":
            summary[position]["cka"] = float(np.mean([e["cka"] for e in vals]))
    return per_key, summary


def analyze(model_path: str, teacher_path: str, corpus: str, sequences: int = 256, seq_len: int = 128,
            batch_size: int = 16, cache_dir: str = ".cache/tcd_ds", max_cka_tokens: int = 8192,
            progress: bool = True) -> dict:
    from tcd_ds.data.shards import PackedDataset, build_token_cache, read_index
    from tcd_ds.data.tokenizer import load_tokenizer

    model, cfg, mdir, teacher, tcfg, tdir, vocab = _load_pair(model_path, teacher_path, seq_len)
    tok = load_tokenizer(str(vocab))
    index = build_token_cache(corpus, tok, cache_dir, seq_len, max_sequences=sequences, progress=False)
    data = PackedDataset(read_index(index))
    if len(data) == 0:
        raise ValueError(f"corpus {corpus} gave no sequences of {seq_len} tokens")
    positions = POSITIONS if cfg.num_heads == tcfg.num_heads else "TI"  # A is per head
    layer_map = [0] + [t + 1 for t in uniform_layer_map(cfg.num_layers, tcfg.num_layers)]
    s_taps = Taps(tap_points(model, positions, True))
    t_taps = Taps(tap_points(teacher, positions, True))
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    feats: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    kept = 0
    n = len(data)
    for start in range(0, n, batch_size):
        batch = data.get_batch(np.arange(start, min(n, start + batch_size)))
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        with torch.no_grad():
            with s_taps as s_cap:
                model(ids, mask, types)
            with t_taps as t_cap:
                teacher(ids, mask, types)
            keys = list(s_cap)
            losses = relation_losses([s_cap[k] for k in keys], [t_cap[(k[0], layer_map[k[1]], k[2])] for k in keys],
                                     mask, form="mse")
        rows = mask.bool().reshape(-1)
        take = rows.nonzero().flatten()[: max(0, max_cka_tokens - kept)]
        for k, loss in zip(keys, losses.tolist()):
            name = _name(k)
            sums[name] = sums.get(name, 0.0) + loss * ids.shape[0]
            counts[name] = counts.get(name, 0) + ids.shape[0]
            if k[0] != "A" and len(take):
                xs, ys = feats.setdefault(name, ([], []))
                tk = (k[0], layer_map[k[1]], k[2])
                xs.append(s_cap[k].reshape(-1, s_cap[k].shape[-1])[take].float())
                ys.append(t_cap[tk].reshape(-1, t_cap[tk].shape[-1])[take].float())
        kept += len(take)
        if progress:
            print(f"analyze: {min(n, start + batch_size)}/{n} sequences", file=sys.stderr, flush=True)
    s_taps.remove()
    t_taps.remove()
    per_key, summary = _summarize(sums, counts, feats, layer_map, positions)
    return {"model": str(mdir), "teacher": str(tdir), "corpus": str(corpus), "sequences": n, "seq_len": seq_len,
            "cka_tokens": kept, "positions": positions, "per_tap": per_key, "mean": summary}


def format_table(result: dict) -> str:
    lines = [f"model {result['model']} vs teacher {result['teacher']} on {result['corpus']} "
             f"({result['sequences']} sequences of {result['seq_len']}; CKA on {result['cka_tokens']} tokens)",
             f"{'tap':<12} {'teacher':>7} {'relation':>10} {'CKA':>7}"]
    for name, e in result["per_tap"].items():
        cka = f"{e['cka']:.4f}" if "cka" in e else "-"
        lines.append(f"{name:<12} {e['teacher_layer']:>7} {e['relation']:>10.5f} {cka:>7}")
    for position, m in result["mean"].items():
        cka = f"{m['cka']:.4f}" if "cka" in m else "-"
        lines.append(f"{'mean ' + position:<12} {'':>7} {m['relation']:>10.5f} {cka:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from tcd_ds.cli import Parser, fail

    p = Parser(prog="python -m tcd_ds.analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="run dir, export dir or Hugging Face BERT dir (dense or MoE)")
    p.add_argument("--teacher", required=True, help="the dense teacher: run dir, export dir or BERT dir")
    p.add_argument("--corpus", required=True, help="held-out text: a text file, a dir of them, or WikiExtractor output")
    p.add_argument("--sequences", type=int, default=256, help="sequences read from the corpus")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    p.add_argument("--cache-dir", default=".cache/tcd_ds", help="token cache")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    try:
        if args.sequences < 1 or args.batch_size < 1 or args.seq_len < 8:
            raise ValueError("--sequences and --batch-size must be >= 1 and --seq-len >= 8")
        result = analyze(args.model, args.teacher, args.corpus, args.sequences, args.seq_len, args.batch_size,
                         args.cache_dir)
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as err:
        fail(err)
    print(format_table(result))
    if args.out:
        from tcd_ds.atomic import write_json_atomic

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
