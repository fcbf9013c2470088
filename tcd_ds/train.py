"""Pre-train vanilla, MoE and TCD models under DeepSpeed (ZeRO, expert parallelism).

    deepspeed --num_accelerators 2 tcd_ds/train.py --config tiny --mode tcd \\
        --deepspeed_config ds_configs/cpu_zero2.json teacher.path=runs/teacher run_dir=runs/tcd

also `python -m tcd_ds.train ...` for one process. `main()` builds everything with small
`build_*` functions and runs one loop for the three modes:
- vanilla: the dense teacher (MLM only);
- moe: the MoE-BERT baseline (MLM + load balancing);
- tcd: the MoE-BERT student + a frozen teacher replica on every rank + relation losses.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a file by the deepspeed launcher: make the package importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tcd_ds import checkpoint
from tcd_ds.atomic import write_json_atomic
from tcd_ds.config import Config, ConfigError, DataConfig, ModelConfig, build_config, to_dict
from tcd_ds.data.corpus import is_local_source
from tcd_ds.data.fallback import is_fallback_vocab, resolve_sources, vocab_falls_back, warn_stderr
from tcd_ds.data.mlm import mask_tokens, mlm_generator
from tcd_ds.data.shards import PackedDataset, SampleOrder, build_token_cache, read_index, split_train_val
from tcd_ds.data.tokenizer import load_tokenizer, resolve_vocab_path, special_ids
from tcd_ds.dist import Layout, detect_layout, init_distributed, one_rank_first
from tcd_ds.distill.objective import RelationObjective, check_compatible
from tcd_ds.distill.taps import Taps, tap_points
from tcd_ds.distill.teacher import FrozenTeacher, load_teacher, read_teacher_config, teacher_dir
from tcd_ds.model.bert import BertForMaskedLM, flops_per_token, num_parameters
from tcd_ds.memory import format_plan, memory_plan
from tcd_ds.model.hf import CheckpointError, config_to_hf
from tcd_ds.hardware import bf16_warning
from tcd_ds.monitor import MetricsLog, Monitor, measure_matmul_peak, quiet_known_warnings, run_summary_block
from tcd_ds.optim import GuardedAdamW, GuardedLambdaLR, lr_lambda, param_groups

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError, OSError)
REQUEUE_EXIT = 85  # exit status after a SIGTERM/SIGUSR1 save: "requeue me" (slurm.conf RequeueExit=85)
NONFINITE_EXIT = 3


# --- arguments and DeepSpeed config -------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from tcd_ds.cli import Parser

    p = Parser(prog="tcd_ds.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="recipe name (tiny, small, base, large, xl) or YAML/JSON path")
    p.add_argument("--mode", choices=("vanilla", "moe", "tcd"), help="overrides the recipe's mode")
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (ds_configs/)")
    p.add_argument("--resume", default="auto", help="auto (latest complete checkpoint, if any), none, or a tag")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the launcher
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=20")
    return p.parse_intermixed_args(argv)  # options and key=value overrides in any order


def load_ds_config(path: str, cfg: Config, device: torch.device) -> dict:
    """Read the DeepSpeed JSON, refuse what cannot work, and fill the "auto" values from cfg.train."""
    try:
        ds = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    uses_ds_moe = cfg.mode != "vanilla" and cfg.model.moe.backend == "deepspeed"
    if stage == 3 and uses_ds_moe:
        raise ConfigError(f"{path}: ZeRO stage 3 is not supported with DeepSpeed-MoE; use stage 1 or 2")
    if stage == 3 and cfg.mode != "vanilla":
        raise ConfigError(f"{path}: ZeRO stage 3 is not supported for MoE models here; use stage 1 or 2")
    if ds.get("fp16", {}).get("enabled") and device.type == "cpu":
        raise ConfigError(f"{path}: fp16 is not supported on CPU; use a bf16 or fp32 config (ds_configs/cpu_*.json)")
    check_gpu_paths(path, ds, cfg, device)
    wanted = {"train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
              "gradient_accumulation_steps": cfg.train.grad_accum, "gradient_clipping": cfg.train.grad_clip}
    for key, value in wanted.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(f"{path} sets {key}={ds[key]} but the run config says {value}: set it to \"auto\" "
                              "in the JSON (the train.* keys are the single source)")
    ds.pop("train_batch_size", None)
    ds.setdefault("steps_per_print", 10 ** 9)
    ds["zero_allow_untested_optimizer"] = True  # GuardedAdamW is torch's AdamW plus a skip guard
    return ds


def check_gpu_paths(path: str, ds: dict, cfg: Config, device: torch.device) -> None:
    """Refuse the device/precision/backend combinations that cannot run, before any compute (docs/gpu.md
    lists every GPU combination and how it is covered). The `grouped` backend is not refused in fp16 or
    fp32 on CUDA: torch 2.13's grouped_mm takes fp32/bf16/fp16 there (`_grouped_mm_validate_inputs`),
    with bf16 on SM90/SM100 on the fast kernel and everything else on its per-group mm fallback."""
    if cfg.mode == "vanilla" or cfg.model.moe.backend != "megablocks":
        return
    import importlib.util

    if device.type != "cuda":
        raise ConfigError(f"model.moe.backend=megablocks needs an NVIDIA GPU and this run is on {device.type}: "
                          "set model.moe.backend=grouped (dropless grouped matmuls) or torch")
    if importlib.util.find_spec("megablocks") is None:
        raise ConfigError("model.moe.backend=megablocks needs the megablocks package, which is not installed: "
                          "pip install -r requirements-gpu.txt, or set model.moe.backend=grouped")
    if not ds.get("bf16", {}).get("enabled"):
        precision = "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
        raise ConfigError(f"{path}: model.moe.backend=megablocks runs MegaBlocks' grouped GEMMs, which take bf16 "
                          f"only, but this config trains in {precision}: enable \"bf16\" in the DeepSpeed config "
                          "(e.g. ds_configs/gpu_zero2_bf16.json) or set model.moe.backend=grouped")


def check_parallel(cfg: Config, layout: Layout) -> None:
    ep = cfg.model.moe.ep_size if cfg.mode != "vanilla" else 1
    if layout.world_size % ep:
        raise ConfigError(f"model.moe.ep_size={ep} does not divide the world size {layout.world_size}")


# --- builders -----------------------------------------------------------------------------

@dataclass
class Data:
    train: PackedDataset
    val: PackedDataset
    evals: dict[str, PackedDataset]  # held-out sets from elsewhere (WikiText-2, novels, ...)
    order: SampleOrder
    special: object
    vocab_size: int


def build_data(cfg: Config, layout: Layout) -> Data:
    show = layout.is_main
    # a missing default corpus/vocab (no ../shared/data) falls back to bundled real text. What is built
    # on disk (that fallback, the token caches) is built by rank 0 while the others wait at a barrier,
    # then reused (one_rank_first: no cross-node file lock)
    cfg.data.corpus, cfg.data.vocab = one_rank_first(lambda: resolve_sources(
        cfg.data.corpus, cfg.data.vocab, cfg.data.cache_dir, warn=warn_stderr if show else None), layout)
    tok = load_tokenizer(cfg.data.vocab)
    sp = special_ids(tok)
    limit = cfg.data.max_documents or None
    index = one_rank_first(lambda: build_token_cache(cfg.data.corpus, tok, cfg.data.cache_dir, cfg.data.max_seq_len,
                                                     max_documents=limit, progress=show), layout)
    train, val = split_train_val(index, cfg.data.val_fraction)
    evals = {}
    for name, source in cfg.data.eval_sets().items():
        if not Path(source).exists():
            if show:
                print(f"eval set {name}: {source} not found, skipped", file=sys.stderr)
            continue
        path = one_rank_first(lambda: build_token_cache(source, tok, cfg.data.cache_dir, cfg.data.max_seq_len,
                                                        max_sequences=cfg.data.eval_max_sequences, progress=show),
                              layout)
        evals[name] = PackedDataset(read_index(path))
    order = SampleOrder(len(train), cfg.seed, layout.world_size, cfg.train.micro_batch_size, cfg.train.grad_accum)
    return Data(train, val, evals, order, sp, sp.vocab_size)


def build_model(cfg: Config, vocab_size: int) -> tuple[BertForMaskedLM, ModelConfig]:
    model_cfg = cfg.student_model()
    if model_cfg.vocab_size != vocab_size and is_fallback_vocab(cfg.data.vocab):
        cfg.model.vocab_size = vocab_size  # the fallback vocab (see build_data) sets the size
        model_cfg = cfg.student_model()
    if model_cfg.vocab_size != vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} but the tokenizer ({cfg.data.vocab}) has "
                          f"{vocab_size} tokens")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    return BertForMaskedLM(model_cfg), model_cfg


def build_teacher(cfg: Config, model_cfg: ModelConfig, device: torch.device
                  ) -> tuple[FrozenTeacher | None, RelationObjective | None]:
    if cfg.mode != "tcd":
        return None, None
    teacher = load_teacher(cfg.teacher.path, cfg.distill, cfg.teacher.dtype, device)
    check_compatible(model_cfg, teacher.config, cfg.distill)
    objective = RelationObjective(cfg.distill, model_cfg.num_layers, teacher.config.num_layers)
    teacher.num_layers = objective.teacher_layers_needed  # stop the teacher at its deepest tapped layer
    return teacher, objective


def untag_replicated_experts(model: torch.nn.Module) -> None:
    """torch/grouped experts live on every rank (ep_size 1): their expert-data-parallel group is the
    data-parallel group. DeepSpeed's engine only honours expert tags around its own MoE layers, so
    these are handed to it as ordinary data-parallel parameters (same reduction, same result)."""
    from deepspeed.moe.layer import MoE

    if any(isinstance(m, MoE) for m in model.modules()):
        return
    for p in model.parameters():
        if getattr(p, "allreduce", True) is False:
            p.allreduce = True
            del p.group_name


def build_engine(cfg: Config, model: BertForMaskedLM, ds_config: dict):
    import deepspeed

    untag_replicated_experts(model)
    t = cfg.train
    optimizer = GuardedAdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    scheduler = GuardedLambdaLR(optimizer, lr_lambda(t))  # a skipped step does not advance the schedule
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    return engine, optimizer, scheduler


# --- one step, evaluation ---------------------------------------------------------------------

def make_batch(data: Data, dataset: PackedDataset, indices, seed: int, step: int, rank: int, micro: int,
               mlm_probability: float, device: torch.device) -> dict[str, torch.Tensor]:
    batch = dataset.get_batch(indices)
    ids, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], data.special, data.vocab_size,
                              mlm_generator(seed, step, rank, micro), mlm_probability)
    batch["input_ids"], batch["labels"] = ids, labels
    return {k: v.to(device) for k, v in batch.items()}


def all_mean(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Mean over ranks (for logging only)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


@torch.no_grad()
def evaluate(engine, data: Data, dataset: PackedDataset, cfg: Config, layout: Layout, device: torch.device
             ) -> dict[str, float]:
    """MLM loss / accuracy on a held-out set with fixed masks; every rank runs the same number of
    batches (expert parallelism needs every rank in every forward), on disjoint slices."""
    was_training = engine.module.training
    engine.module.eval()
    mb, world = cfg.train.micro_batch_size, layout.world_size
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n
    for b in range(cfg.train.eval_batches):
        start = (b * world + layout.rank) * mb
        indices = [(start + i) % len(dataset) for i in range(mb)]
        batch = make_batch(data, dataset, indices, cfg.seed + 1, b, layout.rank, 0, cfg.data.mlm_probability, device)
        out = engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=batch["labels"])
        n = out.num_masked.double()
        sums += torch.stack([out.mlm_loss.double() * n, out.correct.double(), n])
    if dist.is_initialized():
        dist.all_reduce(sums)
    engine.module.train(was_training)
    loss = (sums[0] / sums[2]).item()
    return {"mlm_loss": loss, "accuracy": (sums[1] / sums[2]).item(), "perplexity": math.exp(min(loss, 50.0))}


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row: the message names the step and the loss terms."""


TERMS = ("mlm", "aux", "L_T", "L_I", "L_A")  # the loss terms checked for non-finite values, in order


def forward_loss(engine, batch: dict, taps: Taps | None, teacher: FrozenTeacher | None,
                 objective: RelationObjective | None, fault: str | None = None):
    """One micro-batch forward: (loss, logged parts incl. every loss term, model output)."""
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    if taps:
        with taps:
            out = engine(*inputs, labels=batch["labels"])
        rel, terms = objective(taps.captured, teacher(*inputs), batch["attention_mask"])
        loss = out.loss + rel
    else:
        out, terms = engine(*inputs, labels=batch["labels"]), {}
        loss = out.loss
    parts = {"mlm": out.mlm_loss.detach(), "aux": out.aux_loss.detach(),
             "mlm_accuracy": out.correct / out.num_masked.clamp(min=1)}
    for k, v in terms.items():  # 'T' -> L_T; 'T/3' -> relation/L_T/3 (per layer)
        parts[f"relation/L_{k}" if "/" in k else f"L_{k}"] = v
    for s in out.moe_stats:
        parts["balance"] = parts.get("balance", 0.0) + s.balance_loss.detach() / len(out.moe_stats)
        parts["dropped"] = parts.get("dropped", 0.0) + s.dropped / len(out.moe_stats)
    if fault:  # fault injection for the reliability tests (TCD_INJECT_NONFINITE)
        if fault == "grad":
            poison = next(engine.module.parameters()).sum() * 0.0
            poison.register_hook(lambda g: g * float("nan"))
            loss = loss + poison
        else:
            parts[fault] = torch.tensor(float("nan"))
            loss = loss + parts[fault].to(loss.device)
    parts["loss"] = loss.detach()
    return loss, parts, out


def nonfinite_terms(parts: dict, device: torch.device) -> list[str]:
    """Names of the loss terms that are non-finite on any rank (the same list on every rank)."""
    flags = torch.tensor([0.0 if k not in parts or math.isfinite(float(parts[k])) else 1.0 for k in TERMS],
                         device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [k.removeprefix("L_") if k.startswith("L_") else k.upper() if k == "mlm" else k
            for k, f in zip(TERMS, flags.tolist()) if f]


def injected_faults() -> dict[int, str]:
    """`TCD_INJECT_NONFINITE="3:mlm,4:grad"`: make step 3's MLM loss NaN and step 4's gradients NaN."""
    out = {}
    for item in filter(None, os.environ.get("TCD_INJECT_NONFINITE", "").split(",")):
        step, term = item.split(":")
        out[int(step)] = term if term == "grad" else {"mlm": "mlm", "aux": "aux"}.get(term, f"L_{term}")
    return out


def save_checkpoint(engine, ckpt_dir: Path, step: int, client: dict, model_config: dict, cfg: Config,
                    device: torch.device) -> Path:
    """Save on every rank; if any rank fails to write, every rank stops with one clear line and the
    previous complete checkpoint stays the one `latest` points to."""
    error = None
    try:
        path = checkpoint.save(engine, ckpt_dir, step, client, model_config, cfg.train.keep_checkpoints)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError of its zip writer
        free = shutil.disk_usage(ckpt_dir).free / 2 ** 20 if ckpt_dir.exists() else 0.0
        error = f"{str(err).splitlines()[0]} ({free:.1f} MiB free there)"
    failed = torch.tensor([1.0 if error else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        previous, _ = checkpoint.find_latest(ckpt_dir)
        raise CheckpointError(f"cannot write the checkpoint of step {step} under {ckpt_dir}: "
                              f"{error or 'another rank failed to write'}; the last complete checkpoint "
                              f"({previous or 'none'}) is intact")
    return path


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes its step, saves (no eval first: the time left
    before the job's limit is for the save), and exits. Installed first thing in `main()`: a signal
    during start-up (data, model, teacher, engine, resume) then stops the run after its first step
    instead of killing the process."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# --- the loop ---------------------------------------------------------------------------------

def train(cfg: Config, layout: Layout, device: torch.device, ds_config: dict, resume: str,
          stop: StopRequest | None = None) -> dict:
    run_dir, ckpt_dir = Path(cfg.run_dir), Path(cfg.run_dir) / "checkpoints"
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    print(f"rank {layout.rank}/{layout.world_size} (local {layout.local_rank}) on {node}, device {device}, "
          f"launcher {layout.launcher}", file=sys.stderr, flush=True)
    if layout.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    try:
        data = build_data(cfg, layout)
    except (ValueError, OSError) as err:  # an empty or too short corpus, a bad vocab, an unreadable file
        raise ConfigError(f"data: {err}") from None
    model, model_cfg = build_model(cfg, data.vocab_size)
    teacher, objective = build_teacher(cfg, model_cfg, device)
    engine, optimizer, scheduler = build_engine(cfg, model, ds_config)
    taps = Taps(tap_points(engine.module, cfg.distill.positions, cfg.distill.include_embeddings)) if teacher else None

    step, tokens = 0, 0
    if resume != "none":
        tag, skipped = (resume, []) if resume != "auto" else checkpoint.find_latest(ckpt_dir)
        for reason in skipped:
            print(f"resume: skipped {reason}", file=sys.stderr) if layout.is_main else None
        if tag is not None:
            client = checkpoint.resume(engine, ckpt_dir, tag, layout.rank, config_to_hf(model_cfg))
            step, tokens = client["step"], client["tokens"]
            if layout.is_main:
                print(f"resume: from {ckpt_dir / tag} (step {step})", file=sys.stderr)

    monitor = Monitor(run_dir, layout.is_main, cfg.train.max_steps, step)
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else (
        torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32)
    if layout.is_main and device.type == "cpu" and dtype == torch.bfloat16 and bf16_warning():
        monitor.message(bf16_warning())
    peak = measure_matmul_peak(device, dtype) if layout.is_main else 0.0
    fpt = flops_per_token(model_cfg, cfg.data.max_seq_len, cfg.data.mlm_probability)
    if layout.is_main:
        monitor.message(f"{cfg.mode}: {num_parameters(model) / 1e6:.2f}M parameters "
                        f"({num_parameters(model, active=True) / 1e6:.2f}M active), world {layout.world_size}, "
                        f"{len(data.train)} training sequences of {cfg.data.max_seq_len}, dtype {dtype}, "
                        f"matmul peak {peak / 1e9:.1f} GFLOP/s")
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
        teacher_dtype = names[next(teacher.parameters()).dtype] if teacher else "fp16"
        monitor.message(format_plan(memory_plan(
            model_cfg, cfg.train.micro_batch_size, cfg.data.max_seq_len, layout.world_size,
            ds_config.get("zero_optimization", {}).get("stage", 0), names[dtype],
            teacher.config if teacher else None, teacher_dtype)))

    if stop is None:
        stop = StopRequest()
    model_config = config_to_hf(model_cfg)
    metrics = MetricsLog(run_dir / "metrics.jsonl", layout.is_main)
    inject = injected_faults()
    last, window_tokens, window_start = {}, 0, time.perf_counter()
    total_time, skipped_total, in_a_row = 0.0, 0, 0
    interrupted = False

    def save(at: int) -> Path:
        return save_checkpoint(engine, ckpt_dir, at, {"step": at, "tokens": tokens}, model_config, cfg, device)

    try:
        engine.train()
        while step < cfg.train.max_steps:
            step_start = time.perf_counter()
            optimizer.begin_step()
            sums: dict[str, float] = {}
            sample_sum, bad_terms = 0, []  # sample_sum: a checksum of this rank's samples (resume must match it)
            for micro in range(cfg.train.grad_accum):
                indices = data.order.batch_indices(step, micro, layout.rank)
                batch = make_batch(data, data.train, indices, cfg.seed, step, layout.rank, micro,
                                   cfg.data.mlm_probability, device)
                loss, parts, out = forward_loss(engine, batch, taps, teacher, objective, inject.get(step + 1))
                bad = nonfinite_terms(parts, device)
                if bad:  # skipped on every rank: back-propagate an exact zero, and the optimizer step is a no-op
                    bad_terms += [t for t in bad if t not in bad_terms]
                    optimizer.skip_requested = True
                    loss = sum((p.sum() * 0.0 for p in engine.module.parameters() if p.requires_grad),
                               torch.zeros((), device=device))
                engine.backward(loss)
                engine.step()
                if not bad:
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + float(v) / cfg.train.grad_accum
                window_tokens += int(batch["attention_mask"].sum())
                sample_sum += int(indices.sum())
            step += 1
            total_time += time.perf_counter() - step_start

            # skipped by our guard, or by DeepSpeed's ZeRO optimizer itself (it drops a step whose global
            # gradient norm is not finite, and then does not advance the LR schedule)
            if optimizer.skipped or getattr(engine.optimizer, "overflow", False):
                skipped_total, in_a_row = skipped_total + 1, in_a_row + 1
                what = ", ".join(bad_terms) or "gradients"
                monitor.message(f"step {step}: non-finite {what}: step skipped ({in_a_row} in a row)")
                monitor.scalars(step, {"train/skipped_steps": skipped_total})
                if in_a_row >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteError(f"stopped at step {step}: {in_a_row} steps in a row had non-finite {what} "
                                         f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); the last "
                                         f"complete checkpoint is under {ckpt_dir}")
            else:
                in_a_row = 0

            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                logged = all_mean(sums, device)
                elapsed = time.perf_counter() - window_start
                window = all_mean({"tokens": window_tokens}, device)["tokens"] * layout.world_size
                tokens += int(window)
                tps = window / elapsed
                logged.update({"lr": scheduler.get_last_lr()[0], "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                               "tokens_per_second": tps, "tokens": tokens})
                if peak:
                    logged["mfu"] = fpt * tps / (peak * layout.world_size)
                monitor.scalars(step, {("train/" + k if "/" not in k else k): v for k, v in logged.items()})
                log_expert_load(monitor, step, out.moe_stats)
                shown = {k: logged[k] for k in ("loss", "mlm", "aux", "L_T", "L_I", "L_A") if k in logged}
                shown["tok/s"] = tps
                monitor.progress(step, shown)
                last = logged
                metrics.append("train", step, {"samples_rank0": sample_sum,
                                               **{k: v for k, v in logged.items() if "/" not in k}})
                window_tokens, window_start = 0, time.perf_counter()

            stopping = stop.agreed(device)  # before the eval: after a signal, save at once
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps
                    and not stopping):
                metrics.append("eval", step, run_evals(engine, data, cfg, layout, device, monitor, step))
            if stopping:
                interrupted = True
                save(step)
                monitor.message(f"signal {stop.signal}: saved step {step}; exiting with status {REQUEUE_EXIT} (requeue)")
                break
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
                save(step)

        summary = {"mode": cfg.mode, "steps": step, "tokens": tokens, "interrupted": interrupted}
        if not interrupted:
            evals = run_evals(engine, data, cfg, layout, device, monitor, step)
            metrics.append("eval", step, evals)
            final = save(step)
            if layout.is_main:
                checkpoint.export_checkpoint(final, run_dir / "export")
                tok_file = Path(cfg.data.vocab)
                if tok_file.is_file():
                    (run_dir / "export" / "vocab.txt").write_bytes(tok_file.read_bytes())
            summary.update(eval=evals)
        summary.update({
            "final_loss": last.get("loss"), "final_mlm_loss": last.get("mlm"), "final_aux_loss": last.get("aux"),
            "loss_T": last.get("L_T"), "loss_I": last.get("L_I"), "loss_A": last.get("L_A"),
            "tokens_per_second": last.get("tokens_per_second"), "mfu": last.get("mfu"),
            "step_time_s": total_time / max(1, step - monitor.start_step), "world_size": layout.world_size,
            "parameters": num_parameters(model), "active_parameters": num_parameters(model, active=True),
            "history": metrics.read("train"), "eval_history": metrics.read("eval"),
        })
        if layout.is_main:
            write_json_atomic(run_dir / "summary.json", summary)
    finally:  # events written so far reach the disk, also when the run stops on an error
        monitor.close()
        if taps:
            taps.remove()
    return summary


def run_evals(engine, data: Data, cfg: Config, layout: Layout, device: torch.device, monitor: Monitor,
              step: int) -> dict[str, dict[str, float]]:
    results = {"val": evaluate(engine, data, data.val, cfg, layout, device)}
    for name, dataset in data.evals.items():
        results[name] = evaluate(engine, data, dataset, cfg, layout, device)
    for name, metrics in results.items():
        monitor.scalars(step, {f"eval/{name}/{k}": v for k, v in metrics.items()})
    monitor.message("eval step {}: {}".format(step, ", ".join(
        f"{n} mlm {m['mlm_loss']:.3f} acc {m['accuracy']:.3f}" for n, m in results.items())))
    return results


def log_expert_load(monitor: Monitor, step: int, stats) -> None:
    for i, s in enumerate(stats):
        fraction = s.counts.float() / s.counts.sum().clamp(min=1)
        monitor.histogram(step, f"experts/layer{i}/load", fraction)
        monitor.scalars(step, {f"experts/layer{i}/max_fraction": fraction.max().item(),
                               f"experts/layer{i}/dropped_fraction": float(s.dropped)})


def main(argv: list[str] | None = None) -> dict:
    stop = StopRequest()  # first: a SIGUSR1/SIGTERM during start-up must not kill the rank
    args = parse_args(argv)
    quiet_known_warnings()
    overrides = ([f"mode={args.mode}"] if args.mode else []) + args.overrides
    try:
        cfg = build_config(args.config, overrides)
        layout = detect_layout()
        check_parallel(cfg, layout)
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        ds_config = load_ds_config(args.deepspeed_config, cfg, device)
        if cfg.mode == "tcd":
            teacher_cfg, student = read_teacher_config(cfg.teacher.path), cfg.student_model()
            if vocab_falls_back(cfg.data.vocab):  # the fallback vocab's size is known after build_data
                student = dataclasses.replace(student, vocab_size=teacher_cfg.vocab_size)
            check_compatible(student, teacher_cfg, cfg.distill)
        # missing or malformed data inputs: one line, before any compute (a missing *default* path
        # falls back to bundled text instead, see data/fallback.py)
        if cfg.data.corpus != DataConfig().corpus:
            is_local_source(cfg.data.corpus)  # raises for a missing path; False for a hub name
        if cfg.data.vocab != DataConfig().vocab or Path(cfg.data.vocab).exists():
            if resolve_vocab_path(cfg.data.vocab) is not None:  # None: a hub tokenizer name
                load_tokenizer(cfg.data.vocab)
        if args.resume == "auto":  # a changed model shape is refused before any compute
            tag, _ = checkpoint.find_latest(Path(cfg.run_dir) / "checkpoints")
            if tag is not None:
                checkpoint.check_same_model(Path(cfg.run_dir) / "checkpoints" / tag, config_to_hf(cfg.student_model()))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    device = init_distributed(layout, cfg.train.collective_timeout_s)
    try:
        summary = train(cfg, layout, device, ds_config, args.resume, stop)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(NONFINITE_EXIT) from None
    if layout.is_main:  # where everything went
        used = teacher_dir(cfg.teacher.path).resolve() if cfg.mode == "tcd" else None
        info = f"vanilla BERT, {teacher_cfg.num_layers} layers x {teacher_cfg.hidden_size}, frozen" if used else ""
        print(run_summary_block(cfg.run_dir, summary, used, info), flush=True)
    if summary["interrupted"]:
        raise SystemExit(REQUEUE_EXIT)
    return summary


if __name__ == "__main__":
    main()
