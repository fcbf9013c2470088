"""GLUE fine-tuning of a pre-trained (MoE-)BERT export: an lr x seed sweep with resumable results.

    python -m tcd_ds.finetune --model <export dir> --task <TASK> --glue-dir <dir> \\
        [--lrs 2e-5,5e-5] [--seeds 1,2,3] [--epochs N] [--out <dir>]

`--model` is a tcd-ds export (config.json + model.safetensors, MoE models with a `tcd_moe` section)
or a Hugging Face BERT directory saved by `transformers`. Task names as GLUE spells them,
case-insensitive (`CoLA`, `sst-2`, `STSB`, ...); files in the `download_glue_data.py` layout.

What one run is
---------------
`BertForSequenceClassification` (pooler + classifier on [CLS]; STS-B: one output, MSE) on top of the
pre-trained encoder. The encoder must load strictly: the only weights allowed to be absent from the
checkpoint are the pooler (trained from scratch when the checkpoint has none, loaded when it has
one, as Hugging Face does) and the classifier (always new; a checkpoint's own task heads are
ignored). Any other missing or unexpected encoder weight is a `CheckpointError`.

An MoE export fine-tunes with its experts and its router loss: the training loss is the task loss
plus the model's aux loss (`--aux-loss-weight` overrides the load-balancing weight; default: the
model's own). Backend `torch` by default, `--moe-backend grouped` for the grouped-matmul experts.

Training: AdamW (betas 0.9/0.999, eps 1e-8; torch's fused kernel on CPU and CUDA, `optim.adamw`), weight decay by pre-training's rule (`optim.param_groups`:
on every weight matrix, not on biases, experts' stacked biases and LayerNorm weights), pre-training's
schedule (`optim.warmup_decay`): linear warm-up over `--warmup-ratio` of the steps then linear
decay to 0, gradient clipping at
`--max-grad-norm`, dropout `--dropout` (0.1, BERT's, on hidden states and attention, whatever the
model was pre-trained with: the `small` recipes pre-train without dropout), fp32. Each run is seeded: `torch.manual_seed`
before the heads are initialised (and for dropout), plus a separate seeded generator for the
shuffling, so a seed gives the same numbers again on the same machine and thread count (CPU; CUDA
kernels are not guaranteed bitwise reproducible). Batches are padded per batch (dynamic padding), and by
default (`--batching length`) hold examples of similar length: see `epoch_order`.

Evaluation runs at the end of every epoch on `--eval-split` (default `dev`). **The value a run
reports is the eval metrics at the end of its last epoch** (no early stopping, no selection on the
eval set inside a run); the best epoch's metrics are recorded beside it in runs.jsonl for reference.
MNLI with `--eval-split dev` evaluates dev_matched and dev_mismatched and reports `accuracy_m`,
`accuracy_mm` and `accuracy` = their mean, which is what `glue.glue_score` uses. Metrics are
fractions (not percent).

`--max-train-examples` / `--max-eval-examples` keep a subset (for quick CPU runs): N examples drawn
with a fixed generator (seed 0, the same for every run of the sweep), kept in file order.

The sweep and its files
-----------------------
The grid is lrs x seeds, run in that order. Each finished run is appended to `<out>/runs.jsonl` as
one JSON line (flushed and fsynced) with its task, model path, lr, seed, epochs, settings, final
metrics, best epoch, per-epoch history and seconds. On restart, a run whose (task, model path, lr,
seed, epochs) *and* training settings (batch size, max length, warm-up, weight decay, subset sizes,
eval split, MoE options) match a line in runs.jsonl is not run again, so a sweep resumes where it
stopped; lines with other settings are kept but ignored by the summary.

A SIGUSR1 or SIGTERM (a Slurm job's stop signal before its time limit, preemption) stops the sweep
after the current training step: the run's whole state (weights, optimizer, schedule, data order,
random generators, the epoch so far) goes to `<out>/interrupted.pt`, one line says so, and the
command exits with status 85 (slurm/glue_sweep.sh requeues the job on it). The next sweep in that
directory resumes that run from the file, to the same result as a run never stopped (same device
and thread count), and deletes the file once the run is in runs.jsonl.

`<out>/results.json` (written atomically) holds, for every lr, the per-seed values of every metric
and of the GLUE score with their medians; the best lr is the one with the highest median GLUE score
(`glue.glue_score`: the mean of the task's metrics; ties go to the lr listed first), and for it the
per-seed values, median, mean and std of every metric and of the GLUE score. The std is the
**sample** standard deviation (ddof=1; 0.0 with a single seed).

    {"task", "model", "lrs", "seeds", "epochs", "best_lr", "eval_split", "settings", "std_ddof": 1,
     "metrics": {metric: {"per_seed": [...], "median", "mean", "std"}},
     "glue_score": {"per_seed", "median", "mean", "std"},
     "per_lr": {"2e-05": {"per_seed": {metric: [...], "glue_score": [...]},
                          "median": {metric: m, "glue_score": m}}, ...}}

Progress goes to stderr: inside every epoch a line with the step, the running loss and the ETA of
the epoch and of the run (every 10% of the epoch's steps, or every `--progress-seconds`), and one
line per epoch with its metrics; a summary table goes to stdout (a single seed shows its values,
no spread).

Threads
-------
`--threads 0` (the default) picks the CPU thread count at start: the cores this process may run on
(`os.sched_getaffinity`) that are idle (sampled from /proc/stat for a quarter second), at least 1
(an `OMP_NUM_THREADS` set in the environment is kept as it is).
On a host whose cores other processes hold, torch's default (one OpenMP thread per core) makes the
threads wait on each other at every parallel region while the scheduler hands their cores to the
other jobs: throughput collapses (tens of times slower, not 2x). Fewer threads than cores keeps it
near this process's fair share. `--threads N` sets N; the choice is printed, and bitwise
reproducibility holds for the same thread count.

Launchers
---------
Fine-tuning is single-process (one CPU or GPU). Under the `deepspeed` launcher the extra
`--local_rank` argument is accepted and ignored; with `WORLD_SIZE` > 1 the command refuses to run
(every rank would repeat the same sweep into the same files); splitting a sweep over processes is
out of scope: run one command per task or per lr instead, each with its own `--out`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tcd_ds import resources
from tcd_ds.atomic import read_jsonl, write_atomic, write_json_atomic
from tcd_ds.cli import Parser as _Parser
from tcd_ds.cli import fail, format_duration
from tcd_ds.config import ConfigError, ModelConfig, Section, coerce, type_name
from tcd_ds.data import glue
from tcd_ds.data.glue import Example, GlueDataError, TaskSpec
from tcd_ds.optim import adamw, param_groups, warmup_decay
from tcd_ds.data.tokenizer import VOCAB_FILENAME, load_tokenizer, special_ids
from tcd_ds.model.bert import BertForSequenceClassification
from tcd_ds.model.hf import CheckpointError, load_hf_state_dict, read_pretrained
from tcd_ds.locks import RunDirInUse, RunDirLock

DEFAULT_VOCAB = "../shared/data/vocab/bert-base-uncased-vocab.txt"
STD_DDOF = 1  # sample standard deviation over seeds
SUBSET_SEED = 0  # the --max-*-examples subsets are the same for every run


class FinetuneError(ValueError):
    """A bad argument or input for fine-tuning: one line for the user."""


# ---------------------------------------------------------------------------------- arguments


@dataclass
class FinetuneArgs(Section):
    """The command's arguments, typed and checked by `tcd_ds.config`'s one mechanism (the flags are
    these names with dashes: `--batch-size` is `batch_size`); `parse_args` builds it."""

    model: str
    task: str
    glue_dir: str
    lrs: list[float] = field(default_factory=lambda: [2e-5, 5e-5])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    epochs: int = 3
    out: str | None = None
    vocab: str | None = None
    batch_size: int = 32
    batching: str = "length"
    max_seq_len: int = 128
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    aux_loss_weight: float | None = None
    dropout: float = 0.1  # hidden and attention dropout while fine-tuning (BERT's), whatever pre-training used
    moe_backend: str = "torch"
    max_train_examples: int = 0
    max_eval_examples: int = 0
    eval_split: str = "dev"
    threads: int = 0
    progress_seconds: float = 30.0
    device: str | None = None
    local_rank: int | None = None  # the deepspeed launcher's --local_rank=N, ignored (single-process)

    def validate(self) -> "FinetuneArgs":
        """One `--flag: why` line (a ConfigError) for the first bad value."""
        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')}: {why}")

        for name, values, what in (("lrs", self.lrs, "learning rate"), ("seeds", self.seeds, "seed")):
            check(bool(values), name, f"give at least one {what}")
            check(len(set(values)) == len(values), name, f"duplicate {what} in {','.join(map(str, values))}")
        for lr in self.lrs:
            check(math.isfinite(lr) and lr > 0, "lrs", f"learning rate {lr:g} must be a positive number")
        for seed in self.seeds:
            check(seed >= 0, "seeds", f"seed {seed} must be >= 0")
        for name, low in (("epochs", 1), ("batch_size", 1), ("max_seq_len", 8), ("max_train_examples", 0),
                          ("max_eval_examples", 0), ("threads", 0)):
            check(getattr(self, name) >= low, name, f"{getattr(self, name)} must be >= {low}")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"{self.warmup_ratio} must be in [0, 1)")
        check(0 <= self.dropout < 1, "dropout", f"{self.dropout} must be in [0, 1)")
        for name in ("weight_decay", "max_grad_norm", "aux_loss_weight", "progress_seconds"):
            value = getattr(self, name)
            check(value is None or math.isfinite(value) and value >= 0, name, f"{value} must be >= 0")
        return self


def _typed(name: str):
    """argparse's `type=` for the field `name` of FinetuneArgs: `tcd_ds.config.coerce` to its type."""
    tp = typing.get_type_hints(FinetuneArgs)[name]

    def parse(text: str) -> Any:
        try:
            return coerce(text, tp, name)
        except ConfigError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {type_name(tp)}") from None
    return parse


def parse_args(argv: Sequence[str] | None = None) -> FinetuneArgs:
    p = _Parser(prog="python -m tcd_ds.finetune",
                description="Fine-tune a (MoE-)BERT export on one GLUE task over an lr x seed grid.")
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(FinetuneArgs)}
    defaults = {k: v for k, v in defaults.items() if v is not dataclasses.MISSING}  # a required flag has none

    def arg(flag: str, help: str, **kwargs: Any) -> None:  # noqa: A002 - argparse's own name
        name = flag.lstrip("-").replace("-", "_")
        if "choices" not in kwargs and "required" not in kwargs:
            kwargs["type"] = _typed(name)
        p.add_argument(flag, default=defaults.get(name), help=help, **kwargs)

    arg("--model", "export dir (config.json + weights) or a Hugging Face BERT dir", required=True)
    arg("--task", "GLUE task, case-insensitive (CoLA, SST-2, MRPC, STS-B, ...)", required=True)
    arg("--glue-dir", "glue_data/ (holding <TASK>/train.tsv ...) or the task dir", required=True)
    arg("--lrs", "comma-separated (default 2e-5,5e-5)")
    arg("--seeds", "comma-separated (default 1,2,3)")
    arg("--epochs", "epochs of every run")
    arg("--out", "output dir (default: finetune/<task> inside --model)")
    arg("--vocab", f"vocab.txt (default: {VOCAB_FILENAME} in --model if present, else {DEFAULT_VOCAB}, "
                   "relative to the working directory or else to the repository root)")
    arg("--batch-size", "examples per step")
    arg("--batching", "length: batches of similar-length examples, in random order (less padding); "
                      "random: a plain shuffle", choices=("length", "random"))
    arg("--max-seq-len", "tokens per example (truncated)")
    arg("--warmup-ratio", "linear warm-up over this share of the steps")
    arg("--weight-decay", "AdamW weight decay")
    arg("--max-grad-norm", "0 disables clipping")
    arg("--aux-loss-weight", "MoE load-balancing loss weight while fine-tuning (default: the model's)")
    arg("--dropout", "hidden and attention dropout while fine-tuning (default 0.1, BERT's, whatever the model "
                     "was pre-trained with)")
    arg("--moe-backend", "MoE experts' implementation", choices=("torch", "grouped"))
    arg("--max-train-examples", "0 = all")
    arg("--max-eval-examples", "0 = all")
    arg("--eval-split", "split to evaluate on (default dev; MNLI dev = dev_matched + dev_mismatched)")
    arg("--threads", "torch CPU threads; 0: the idle cores among those this process may use, at least 1")
    arg("--progress-seconds", "a progress line at least this often inside an epoch (besides every 10%% of it)")
    arg("--device", "cpu or cuda (default: cuda if available)")
    p.add_argument("--local_rank", "--local-rank", type=_typed("local_rank"), default=None, help=argparse.SUPPRESS)
    try:
        return FinetuneArgs(**vars(p.parse_args(argv))).validate()
    except ConfigError as err:
        p.error(f"argument {err}")


# -------------------------------------------------------------------------------------- model


def build_model(model_dir: str | Path, num_labels: int, aux_loss_weight: float | None = None,
                moe_backend: str = "torch", sd: dict[str, torch.Tensor] | None = None,
                cfg: ModelConfig | None = None, dropout: float | None = None) -> BertForSequenceClassification:
    """A classifier on the pre-trained encoder in `model_dir`; the heads are initialised from the
    global torch RNG (seed it first). Only the pooler (when the checkpoint has none) and the
    classifier may be absent from the checkpoint; anything else is a `CheckpointError`. `dropout`,
    when given, replaces the model's hidden and attention dropout."""
    if sd is None or cfg is None:
        cfg, sd = read_pretrained(model_dir)
    if dropout is not None:
        cfg = dataclasses.replace(cfg, hidden_dropout=dropout, attention_dropout=dropout)
    if cfg.moe.num_experts:
        moe = dataclasses.replace(cfg.moe, backend=moe_backend, ep_size=1)
        if aux_loss_weight is not None:
            moe = dataclasses.replace(moe, aux_loss_weight=aux_loss_weight)
        cfg = dataclasses.replace(cfg, moe=moe)
    cfg.validate()
    try:
        model = BertForSequenceClassification(cfg, num_labels)
    except (ValueError, RuntimeError) as err:  # e.g. the grouped backend's size/torch requirements
        raise FinetuneError(f"{model_dir}: {str(err).splitlines()[0]}") from None
    # Load into the encoder (`model.bert`, pooler included): the loader then drops the checkpoint's
    # heads (cls.*, a classifier) and checks every encoder weight strictly. A checkpoint without a
    # pooler gets the freshly initialised one, under the checkpoint's own naming.
    sd = dict(sd)
    if not any(k.endswith("pooler.dense.weight") for k in sd):
        prefix = "bert." if any(k.startswith("bert.") for k in sd) else ""
        for name, value in model.bert.pooler.state_dict().items():
            sd[f"{prefix}pooler.{name}"] = value.clone()
    try:
        load_hf_state_dict(model.bert, sd, strict=True)
    except CheckpointError as err:
        raise CheckpointError(f"{model_dir}: {err}") from None
    return model


# --------------------------------------------------------------------------------------- data


def _subset(examples: list[Example], limit: int) -> list[Example]:
    if not limit or limit >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(SUBSET_SEED).permutation(len(examples))[:limit])
    return [examples[i] for i in keep]


def encode_examples(tokenizer: Any, examples: Sequence[Example], max_seq_len: int,
                    regression: bool) -> list[dict[str, Any]]:
    """Token ids (`[CLS] a [SEP] (b [SEP])`), token type ids and the label of every example,
    truncated to `max_seq_len` (pairs: longest first); padding happens per batch in `collate`."""
    if not examples:
        return []
    a = [ex.text_a for ex in examples]
    b = [ex.text_b for ex in examples] if examples[0].text_b is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_seq_len, return_attention_mask=False,
                    return_token_type_ids=True)
    out = []
    for i, ex in enumerate(examples):
        if ex.label is None:
            raise GlueDataError(f"example {ex.guid} (line {ex.line}) has no label: that split cannot be "
                                f"used for training or evaluation")
        out.append({"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
                    "label": float(ex.label) if regression else int(ex.label)})
    return out


def collate(items: Sequence[dict[str, Any]], pad_id: int, regression: bool) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of the batch."""
    n, width = len(items), max(len(it["input_ids"]) for it in items)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    types = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, it in enumerate(items):
        k = len(it["input_ids"])
        ids[i, :k] = torch.tensor(it["input_ids"])
        types[i, :k] = torch.tensor(it["token_type_ids"])
        mask[i, :k] = 1
    labels = torch.tensor([it["label"] for it in items], dtype=torch.float32 if regression else torch.long)
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels}


def _eval_splits(spec: TaskSpec, split: str) -> list[str]:
    if spec.name == "MNLI" and split.lower() in ("dev", "validation"):
        return ["dev_matched", "dev_mismatched"]
    return [split]


# ---------------------------------------------------------------------------------- training


def _batches(data: list[dict[str, Any]], batch_size: int, order: Sequence[int] | None = None):
    idx = list(range(len(data))) if order is None else list(order)
    for start in range(0, len(idx), batch_size):
        yield [data[i] for i in idx[start:start + batch_size]]


GROUP_BATCHES = 50  # --batching length: batches per megabatch sorted by length (Hugging Face's group_by_length)


def epoch_order(lengths: Sequence[int], batch_size: int, gen: torch.Generator, batching: str) -> list[int]:
    """One epoch's example order, consumed `batch_size` at a time. `random`: a permutation.
    `length`: the permutation cut into megabatches of GROUP_BATCHES batches, each sorted by length
    (longest first), and the batches of all megabatches shuffled, so a batch holds examples of similar
    length (padding on SST-2: 3.0x the real tokens with random batches, 1.05x grouped) while which
    examples meet and the order of the batches stay random."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if batching == "random":
        return order
    mega = batch_size * GROUP_BATCHES
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [i for b in torch.randperm(len(batches), generator=gen).tolist() for i in batches[b]]


def evaluate(model: nn.Module, spec: TaskSpec, eval_sets: dict[str, list[dict[str, Any]]],
             batch_size: int, pad_id: int, device: torch.device) -> dict[str, float]:
    """The task's metrics on each eval set (MNLI m/mm: `accuracy_m`, `accuracy_mm`, `accuracy`)."""
    model.eval()
    per_split: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name, data in eval_sets.items():
            logits, labels = [], []
            for items in _batches(data, batch_size):
                batch = collate(items, pad_id, spec.is_regression)
                _, out, _ = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                  batch["token_type_ids"].to(device))
                logits.append(out.float().cpu())
                labels.append(batch["labels"])
            per_split[name] = glue.compute_metrics(spec, torch.cat(logits).numpy(), torch.cat(labels).numpy())
    if list(per_split) == ["dev_matched", "dev_mismatched"]:
        m, mm = per_split["dev_matched"]["accuracy"], per_split["dev_mismatched"]["accuracy"]
        return {"accuracy_m": m, "accuracy_mm": mm, "accuracy": (m + mm) / 2}
    return next(iter(per_split.values()))


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


class Progress:
    """A progress line on stderr inside an epoch: every 10% of its steps, or every `every_s` seconds,
    with the running loss, steps/s and the ETA of the epoch and of the run (from the mean step time)."""

    def __init__(self, tag: str, steps_per_epoch: int, epochs: int, every_s: float = 30.0):
        self.tag, self.steps_per_epoch, self.total = tag, steps_per_epoch, steps_per_epoch * epochs
        self.every_s, self.stride = every_s, max(1, math.ceil(steps_per_epoch / 10))
        self.start = self.last = time.perf_counter()
        self.done = 0

    def step(self, epoch: int, step: int, loss: float) -> None:
        """After `step` (1-based) of `epoch` (1-based); `loss` is the epoch's running mean."""
        self.done += 1
        now = time.perf_counter()
        if step == self.steps_per_epoch:  # the epoch line follows
            self.last = now
            return
        if step % self.stride and (not self.every_s or now - self.last < self.every_s):
            return
        self.last = now
        per_step = (now - self.start) / self.done
        print(f"[{self.tag}] {100 * step / self.steps_per_epoch:.0f}% of epoch {epoch}: step {step}/"
              f"{self.steps_per_epoch}, loss {loss:.4f}, {1 / per_step:.2f} steps/s, ETA epoch "
              f"{format_duration(per_step * (self.steps_per_epoch - step))}, run "
              f"{format_duration(per_step * (self.total - self.done))}", file=sys.stderr, flush=True)


REQUEUE_EXIT = 85  # after a SIGUSR1/SIGTERM: the running run is saved, requeue me (as tcd_ds.train)
STATE_FILE = "interrupted.pt"  # <out>/interrupted.pt: the state of the run a signal stopped


class Interrupted(Exception):
    """A SIGUSR1/SIGTERM stopped the sweep (after saving the running run's state, if one ran)."""


class StopSignal:
    """SIGUSR1/SIGTERM (a job's stop signal before its time limit, preemption) set a flag; the sweep
    checks it after every training step and before every run. The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum


def _load_state(path: Path, identity: dict[str, Any], tag: str) -> dict[str, Any] | None:
    """The saved state of this run (same task, model, lr, seed, epochs, settings), else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # read as needed
    except Exception as err:  # a torn or foreign file: the run starts over
        print(f"[{tag}] warning: {path} not readable ({type(err).__name__}: {err}): the run starts over",
              file=sys.stderr, flush=True)
        return None
    return state if state.get("identity") == identity else None


def train_one(model: nn.Module, spec: TaskSpec, train: list[dict[str, Any]],
              eval_sets: dict[str, list[dict[str, Any]]], *, lr: float, seed: int, epochs: int,
              batch_size: int, warmup_ratio: float, weight_decay: float, max_grad_norm: float,
              pad_id: int, device: torch.device, tag: str = "", progress_seconds: float = 30.0,
              batching: str = "length", stop: StopSignal | None = None, state_file: Path | None = None,
              identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune `model` (already seeded and built) and evaluate after every epoch. Returns the
    final (last-epoch) metrics, the best epoch and the per-epoch history.

    With `stop` and `state_file`: after a signal the step ends, the run's whole state (weights,
    optimizer, schedule, data order, random generators, the epoch so far) is written to `state_file`
    and `Interrupted` is raised; a later call with the same `identity` resumes from it where it
    stopped, to the same result as a run never stopped (on the same device and thread count)."""
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = steps_per_epoch * epochs
    warmup = math.ceil(warmup_ratio * total)
    opt = adamw(param_groups(model, weight_decay, split_experts=False), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay(warmup, total))  # linear, to 0
    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    progress = Progress(tag, steps_per_epoch, epochs, progress_seconds)
    lengths = [len(x["input_ids"]) for x in train]
    first_epoch, skip, sums = 1, 0, (0.0, 0.0)
    saved = _load_state(state_file, identity or {}, tag) if state_file is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        gen.set_state(saved["order_generator"])
        torch.set_rng_state(saved["rng"])
        if torch.cuda.is_available() and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"])
        history, first_epoch, skip = saved["history"], saved["epoch"], saved["step"]
        sums, start = (saved["loss_sum"], saved["aux_sum"]), start - saved["seconds"]
        progress.total -= (first_epoch - 1) * steps_per_epoch + skip  # the ETA counts the steps left
        print(f"[{tag}] resuming from {state_file}: epoch {first_epoch}, step {skip}/{steps_per_epoch}",
              file=sys.stderr, flush=True)
    for epoch in range(first_epoch, epochs + 1):
        model.train()
        loss_sum, aux_sum = sums if epoch == first_epoch else (0.0, 0.0)
        epoch_start_order = gen.get_state()  # the epoch's data order is drawn from here
        order = epoch_order(lengths, batch_size, gen, batching)
        for step, items in enumerate(_batches(train, batch_size, order), 1):
            if epoch == first_epoch and step <= skip:  # done before the signal
                continue
            batch = {k: v.to(device) for k, v in collate(items, pad_id, spec.is_regression).items()}
            loss, _, aux = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                                 batch["labels"])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{tag}: non-finite loss at epoch {epoch} (lr {lr:g} too high?)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            sched.step()
            loss_sum += loss.item()
            aux_sum += float(aux.detach())
            progress.step(epoch, step, loss_sum / step)
            if stop is not None and stop.signal is not None and state_file is not None:
                state = {"identity": identity or {}, "epoch": epoch, "step": step, "model": model.state_dict(),
                         "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "order_generator": epoch_start_order, "rng": torch.get_rng_state(),
                         "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                         "history": history, "loss_sum": loss_sum, "aux_sum": aux_sum,
                         "seconds": time.perf_counter() - start}
                write_atomic(state_file, lambda tmp: torch.save(state, tmp))
                raise Interrupted(f"[{tag}] signal {stop.signal}: saved the run at epoch {epoch}, step "
                                  f"{step}/{steps_per_epoch} to {state_file}")
        metrics = evaluate(model, spec, eval_sets, batch_size, pad_id, device)
        elapsed = time.perf_counter() - start
        record = {"epoch": epoch, "train_loss": loss_sum / steps_per_epoch, "aux_loss": aux_sum / steps_per_epoch,
                  "metrics": metrics, "glue_score": glue.glue_score(spec, metrics), "seconds": round(elapsed, 3)}
        history.append(record)
        print(f"[{tag}] epoch {epoch}/{epochs} loss {record['train_loss']:.4f} "
              f"(aux {record['aux_loss']:.4f}) {_fmt_metrics(metrics)} {elapsed:.1f}s",
              file=sys.stderr, flush=True)
    best = max(history, key=lambda r: r["glue_score"])  # the first of equal scores
    return {"metrics": history[-1]["metrics"], "glue_score": history[-1]["glue_score"],
            "best_epoch": {"epoch": best["epoch"], "metrics": best["metrics"], "glue_score": best["glue_score"]},
            "history": history, "seconds": round(time.perf_counter() - start, 3)}


# ------------------------------------------------------------------------------------- sweep


def _read_runs(path: Path) -> list[dict[str, Any]]:
    """The records in runs.jsonl; a torn last line (a crash mid-write) is ignored."""
    return read_jsonl(path, lambda lineno, line: print(f"warning: {path}:{lineno}: not a JSON record, ignored",
                                                      file=sys.stderr))


def _append_run(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():  # after a torn line, start on a fresh one
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def _same_run(rec: dict[str, Any], task: str, model: str, lr: float, seed: int, epochs: int,
              settings: dict[str, Any]) -> bool:
    try:
        return (rec["task"] == task and rec["model"] == model and rec["seed"] == seed
                and rec["epochs"] == epochs and math.isclose(float(rec["lr"]), lr, rel_tol=1e-9)
                and rec.get("settings") == settings)
    except (KeyError, TypeError, ValueError):
        return False


def _lr_key(lr: float) -> str:
    return f"{lr:g}"


def summarize(spec: TaskSpec, runs: dict[tuple[float, int], dict[str, Any]], lrs: Sequence[float],
              seeds: Sequence[int]) -> dict[str, Any]:
    """Per-lr per-seed values and medians; the best lr by median GLUE score; its statistics."""
    def stats(values: list[float]) -> dict[str, Any]:
        arr = np.asarray(values, dtype=np.float64)
        std = float(arr.std(ddof=STD_DDOF)) if arr.size > STD_DDOF else 0.0
        return {"per_seed": values, "median": float(np.median(arr)), "mean": float(arr.mean()), "std": std}

    metric_names = list(runs[(lrs[0], seeds[0])]["metrics"])
    per_lr: dict[str, Any] = {}
    for lr in lrs:
        values = {m: [runs[(lr, s)]["metrics"][m] for s in seeds] for m in metric_names}
        values["glue_score"] = [runs[(lr, s)]["glue_score"] for s in seeds]
        per_lr[_lr_key(lr)] = {"per_seed": values,
                               "median": {m: float(np.median(v)) for m, v in values.items()}}
    best_lr = max(lrs, key=lambda lr: per_lr[_lr_key(lr)]["median"]["glue_score"])  # first of ties
    best = per_lr[_lr_key(best_lr)]["per_seed"]
    return {"best_lr": best_lr,
            "metrics": {m: stats(best[m]) for m in metric_names},
            "glue_score": stats(best["glue_score"]),
            "per_lr": per_lr}


def _resolve_vocab(args: FinetuneArgs) -> str:
    if args.vocab:
        return args.vocab
    inside = Path(args.model) / VOCAB_FILENAME
    if inside.is_file():
        return str(inside)
    beside_repo = resources.ROOT / DEFAULT_VOCAB  # when run from elsewhere
    return DEFAULT_VOCAB if Path(DEFAULT_VOCAB).is_file() or not beside_repo.is_file() else str(beside_repo)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a cgroup cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_times(cores: set[int]) -> tuple[float, float] | None:
    """(idle, total) jiffies summed over `cores`, from /proc/stat (None where there is none)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    idle = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            values = [float(v) for v in fields[:8]]
            idle += values[3] + values[4]  # idle + iowait
            total += sum(values)
    return (idle, total) if total else None


def idle_cores(sample_s: float = 0.25) -> float | None:
    """How many of this process's cores were idle over `sample_s` seconds (None: unknown)."""
    try:
        cores = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = set(range(os.cpu_count() or 1))
    before = _cpu_times(cores)
    time.sleep(sample_s)
    after = _cpu_times(cores)
    if before is None or after is None or after[1] <= before[1]:
        return None
    return len(cores) * (after[0] - before[0]) / (after[1] - before[1])


def choose_threads(available: int, idle: float | None) -> int:
    """One thread per idle core this process may use, at least 1 (all of them when unknown)."""
    if idle is None:
        return available
    return max(1, min(available, int(idle + 0.5)))


def set_threads(requested: int) -> str:
    """Set torch's intra-op threads (`requested`, or 0: chosen by `choose_threads`); returns a note."""
    available = available_cores()
    if requested:
        torch.set_num_threads(requested)
        return f"{requested} threads (--threads; {available} cores available)"
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return f"{torch.get_num_threads()} threads (OMP_NUM_THREADS; {available} cores available)"  # the user's
    idle = idle_cores()
    n = choose_threads(available, idle)
    torch.set_num_threads(n)
    busy = "" if idle is None else f", {idle:.1f} idle"
    return f"{n} thread{'s' * (n != 1)} ({available} cores available{busy}; --threads N to override)"


def _device_and_model(args: FinetuneArgs):
    """The device and its thread setting, the task and the pre-trained model (config, weights),
    refused with one line where they cannot fine-tune."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise FinetuneError(f"fine-tuning is single-process, but WORLD_SIZE={world}: run "
                            f"`python -m tcd_ds.finetune ...` (one command per task or lr) instead")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = set_threads(args.threads) if device.type == "cpu" else f"device {device}"
    spec = glue.get_task(args.task)
    if spec.name not in glue.GLUE_TASKS:
        raise FinetuneError(f"{spec.name} has no training data (it is a test-only diagnostic set)")
    cfg, sd = read_pretrained(args.model)
    if args.max_seq_len > cfg.max_position:
        raise FinetuneError(f"--max-seq-len {args.max_seq_len} exceeds the model's max_position {cfg.max_position}")
    return device, threads, spec, cfg, sd


def _task_data(args: FinetuneArgs, spec: TaskSpec, cfg: ModelConfig):
    """The encoded training examples, eval sets, the tokenizer's special ids and the vocab file."""
    train_ex = _subset(glue.read_split(args.glue_dir, spec, "train"), args.max_train_examples)
    eval_ex = {s: _subset(glue.read_split(args.glue_dir, spec, s), args.max_eval_examples)
               for s in _eval_splits(spec, args.eval_split)}
    if not train_ex or not all(eval_ex.values()):
        raise GlueDataError(f"{spec.name}: empty train or {args.eval_split} split in {args.glue_dir}")
    vocab = _resolve_vocab(args)
    try:
        tokenizer = load_tokenizer(vocab)
        ids = special_ids(tokenizer)
    except ValueError as err:  # a malformed vocab.txt: one line naming the file
        raise FinetuneError(str(err)) from None
    if ids.vocab_size > cfg.vocab_size:
        raise FinetuneError(f"tokenizer {vocab} has {ids.vocab_size} tokens but the model's vocab_size is "
                            f"{cfg.vocab_size}: wrong --vocab for {args.model}?")
    train = encode_examples(tokenizer, train_ex, args.max_seq_len, spec.is_regression)
    eval_sets = {s: encode_examples(tokenizer, ex, args.max_seq_len, spec.is_regression) for s, ex in eval_ex.items()}
    return train, eval_sets, ids, vocab


def _run_settings(args: FinetuneArgs, cfg: ModelConfig, vocab: str) -> dict[str, Any]:
    """The settings a finished run must share to be reused (runs.jsonl) and results.json records."""
    return {"batch_size": args.batch_size, "batching": args.batching, "max_seq_len": args.max_seq_len,
            "warmup_ratio": args.warmup_ratio, "weight_decay": args.weight_decay,
            "max_grad_norm": args.max_grad_norm, "max_train_examples": args.max_train_examples,
            "max_eval_examples": args.max_eval_examples, "eval_split": args.eval_split.lower(),
            "vocab": str(Path(vocab).resolve()),
            "aux_loss_weight": args.aux_loss_weight if cfg.moe.num_experts else None, "dropout": args.dropout,
            "moe_backend": args.moe_backend if cfg.moe.num_experts else None}


def run_sweep(args: FinetuneArgs, stop: StopSignal | None = None) -> dict[str, Any]:
    """Run (or resume) the lr x seed grid, write runs.jsonl and results.json, return the results.
    With `stop`: after a signal the running run is saved to <out>/interrupted.pt (resumed from there
    by the next sweep) and `Interrupted` is raised."""
    device, threads, spec, cfg, sd = _device_and_model(args)
    model_path = str(Path(args.model).resolve())
    train, eval_sets, ids, vocab = _task_data(args, spec, cfg)
    settings = _run_settings(args, cfg, vocab)
    out = Path(args.out) if args.out else Path(args.model) / "finetune" / spec.name
    out.mkdir(parents=True, exist_ok=True)
    with RunDirLock.acquire(out, "fine-tuning"):  # before reading what ran: one sweep at a time here
        runs_file = out / "runs.jsonl"
        previous = _read_runs(runs_file)
        kind = f"MoE ({cfg.moe.num_experts} experts, top-{cfg.moe.top_k})" if cfg.moe.num_experts else "dense"
        print(f"{spec.name}: {len(train)} train / {', '.join(f'{len(v)} {k}' for k, v in eval_sets.items())} "
              f"examples; {kind} model {args.model}; lrs {','.join(map(_lr_key, args.lrs))} seeds "
              f"{','.join(map(str, args.seeds))} epochs {args.epochs}; {threads}; out {out}", file=sys.stderr,
              flush=True)

        done: dict[tuple[float, int], dict[str, Any]] = {}
        for lr in args.lrs:
            for seed in args.seeds:
                tag = f"{spec.name} lr={_lr_key(lr)} seed={seed}"
                found = [r for r in previous if _same_run(r, spec.name, model_path, lr, seed, args.epochs, settings)]
                if found:
                    done[(lr, seed)] = found[-1]
                    print(f"[{tag}] already in {runs_file}, skipped", file=sys.stderr, flush=True)
                    continue
                if stop is not None and stop.signal is not None:
                    raise Interrupted(f"[{tag}] signal {stop.signal}: stopped before this run")
                torch.manual_seed(seed)
                model = build_model(args.model, spec.num_labels, args.aux_loss_weight, args.moe_backend,
                                    sd=sd, cfg=cfg, dropout=args.dropout).to(device)
                identity = {"task": spec.name, "model": model_path, "lr": lr, "seed": seed, "epochs": args.epochs,
                            "settings": settings}
                result = train_one(model, spec, train, eval_sets, lr=lr, seed=seed, epochs=args.epochs,
                                   batch_size=args.batch_size, warmup_ratio=args.warmup_ratio,
                                   weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                                   pad_id=ids.pad, device=device, tag=tag, progress_seconds=args.progress_seconds,
                                   batching=args.batching, stop=stop, state_file=out / STATE_FILE,
                                   identity=identity)
                record = {"task": spec.name, "model": model_path, "lr": lr, "seed": seed, "epochs": args.epochs,
                          "settings": settings, "num_train": len(train), **result}
                _append_run(runs_file, record)
                if _load_state(out / STATE_FILE, identity, tag) is not None:  # this run's: done with
                    (out / STATE_FILE).unlink()
                done[(lr, seed)] = record
                del model

        summary = summarize(spec, done, args.lrs, args.seeds)
        results = {"task": spec.name, "model": model_path, "lrs": list(args.lrs), "seeds": list(args.seeds),
                   "epochs": args.epochs, "best_lr": summary["best_lr"], "eval_split": args.eval_split.lower(),
                   "reported": "eval metrics at the end of the last epoch; best lr = highest median glue_score",
                   "std_ddof": STD_DDOF, "settings": settings, "metrics": summary["metrics"],
                   "glue_score": summary["glue_score"], "per_lr": summary["per_lr"]}
        write_json_atomic(out / "results.json", results)
        print(format_table(results))
        return results


def format_table(results: dict[str, Any]) -> str:
    """The per-lr medians and the best lr's mean +- std, as a plain-text table."""
    names = list(results["metrics"]) + ["glue_score"]
    lines = [f"{results['task']}  ({results['model']}, {results['epochs']} epochs, seeds "
             f"{','.join(map(str, results['seeds']))}; values in %)",
             f"{'lr':>10}  " + "  ".join(f"{n:>12}" for n in names)]
    for lr, entry in results["per_lr"].items():
        mark = " *" if float(lr) == results["best_lr"] else ""
        lines.append(f"{lr:>10}  " + "  ".join(f"{100 * entry['median'][n]:>12.2f}" for n in names)
                     + f"   (median){mark}")
    best = {**results["metrics"], "glue_score": results["glue_score"]}
    if len(results["seeds"]) == 1:  # one sample: its value, no spread
        lines.append(f"{'best':>10}  " + "  ".join(f"{100 * best[n]['mean']:>12.2f}" for n in names)
                     + f"   (seed {results['seeds'][0]}, lr {results['best_lr']:g})")
    else:
        lines.append(f"{'best':>10}  " + "  ".join(f"{100 * best[n]['mean']:>6.2f}+-{100 * best[n]['std']:<5.2f}"
                                                 for n in names) + f"   (mean+-sample std, lr {results['best_lr']:g})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point: parse, run the sweep, return the results. Expected failures (missing or
    malformed data, a bad checkpoint, bad arguments) print one `error:` line and exit with 2; a
    SIGUSR1/SIGTERM saves the running run and exits with 85."""
    args = parse_args(argv)  # bad arguments: one `error:` line, exit 2 (tcd_ds/cli.py)
    with StopSignal() as stop:
        try:
            return run_sweep(args, stop)
        except Interrupted as why:
            print(f"{why}; exiting with status {REQUEUE_EXIT} (requeue: the next sweep resumes it)",
                  file=sys.stderr, flush=True)
            raise SystemExit(REQUEUE_EXIT) from None
        except (GlueDataError, CheckpointError, ConfigError, FinetuneError, FloatingPointError, OSError,
                RunDirInUse) as err:
            fail(err)


if __name__ == "__main__":
    main()
