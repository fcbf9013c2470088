"""Pre-train vanilla, MoE and TCD models under DeepSpeed (ZeRO, expert parallelism).

    deepspeed --num_accelerators 2 tcd_ds/train.py --config tiny --mode tcd \\
        --deepspeed_config ds_configs/cpu_zero2.json teacher.path=runs/teacher run_dir=runs/tcd

also `python -m tcd_ds.train ...` for one process. `main()` resolves the run once (`resolve_run`:
recipe + overrides, DeepSpeed JSON and environment -> the frozen `Run` that run_config.json
records), builds from it with small `build_*` functions and runs one loop (`train`: batch -> step
-> log -> eval -> save, then `finish`) for the three modes:
- vanilla: the dense teacher (MLM only);
- moe: the MoE-BERT baseline (MLM + load balancing);
- tcd: the MoE-BERT student + a frozen teacher replica on every rank + relation losses.
"""
from __future__ import annotations

# Run as a file (`deepspeed tcd_ds/train.py`: the launcher starts each rank as `python -u <script>`),
# the package this file belongs to goes first on the path: without it an uninstalled checkout cannot
# import tcd_ds, and a checkout beside an editable install of another tree (a git worktree) would run
# this file against the other tree's modules. `python -m tcd_ds.train` does not come here.
if __package__ in (None, ""):
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tcd_ds import checkpoint, resources
from tcd_ds.atomic import read_json, write_json_atomic
from tcd_ds.cli import fail
from tcd_ds.config import (Config, ConfigError, DataConfig, ModelConfig, build_config, freeze, from_dict, to_dict,
                           with_values)
from tcd_ds.data.corpus import is_local_source
from tcd_ds.data.fallback import is_fallback_vocab, resolve_sources, vocab_falls_back, warn_stderr
from tcd_ds.data.mlm import mask_tokens, mlm_generator
from tcd_ds.data.shards import PackedDataset, SampleOrder, build_token_cache, read_index, split_train_val
from tcd_ds.data.tokenizer import load_tokenizer, resolve_vocab_path, special_ids
from tcd_ds.dist import (Layout, check_expert_groups_local, close_ranks, detect_layout, device_for,
                         init_distributed, one_rank_first)
from tcd_ds.distill.objective import RelationObjective, check_compatible
from tcd_ds.distill.taps import Taps, tap_points
from tcd_ds.distill.teacher import (FrozenTeacher, check_teacher_positions, load_teacher, read_teacher_config,
                                   teacher_dir)
from tcd_ds.hardware import bf16_warning
from tcd_ds.memory import format_plan, memory_plan
from tcd_ds.model.bert import BertForMaskedLM, flops_per_token, num_parameters
from tcd_ds.model.experts import registry as moe_backends
from tcd_ds.model.hf import CheckpointError, config_to_hf
from tcd_ds.monitor import MetricsLog, Monitor, measure_matmul_peak, quiet_known_warnings, run_summary_block
from tcd_ds.optim import GuardedAdamW, GuardedLambdaLR, build_optimizer
from tcd_ds.locks import RunDirInUse, RunDirLock

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError, OSError)
REQUEUE_EXIT = 85  # exit status after a SIGTERM/SIGUSR1 save: "requeue me" (slurm.conf RequeueExit=85)
NONFINITE_EXIT = 3


# --- arguments and DeepSpeed config -------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from tcd_ds.cli import Parser

    p = Parser(prog="tcd_ds.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="recipe name (tiny, small, base, large, xl) or YAML/JSON path")
    p.add_argument("--mode", choices=("vanilla", "moe", "tcd"), help="overrides the recipe's mode")
    p.add_argument("--deepspeed_config", required=True,
                   help="DeepSpeed JSON (ds_configs/), or auto: the faster one here (CPU: bf16 for dense models "
                        "where the CPU has bf16 matmul instructions, else fp32; ZeRO-2 on several ranks, "
                        "stage 0 on one; GPU: gpu_zero2_bf16.json)")
    p.add_argument("--resume", default="auto", help="auto (latest complete checkpoint, if any), none, or a tag")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the launcher
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=20")
    return p.parse_intermixed_args(argv)  # options and key=value overrides in any order


def auto_ds_config(device: torch.device, moe: bool = False, ranks: int = 2) -> str:
    """`--deepspeed_config auto`: the faster shipped config for this device, model kind and world size
    (tcd_ds/hardware.py on CPU)."""
    from tcd_ds.hardware import cpu_ds_config

    name = "ds_configs/gpu_zero2_bf16.json" if device.type == "cuda" else cpu_ds_config(moe=moe, ranks=ranks)
    return resources.ds_config(name)


def load_ds_config(path: str, cfg: Config, device: torch.device, ranks: int = 1) -> dict:
    """Read the DeepSpeed JSON (`auto`: `auto_ds_config`), refuse what cannot work, and fill the
    "auto" values from cfg.train."""
    if path == "auto":
        local_experts = cfg.mode != "vanilla" and cfg.model.moe.backend in ("torch", "grouped")
        path = auto_ds_config(device, moe=local_experts, ranks=ranks)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"--deepspeed_config auto: {path}", file=sys.stderr, flush=True)
    try:
        ds = json.loads(Path(resources.ds_config(path)).read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage in (1, 2) and ds["zero_optimization"].get("compute_grad_norm") is False:
        raise ConfigError(f"{path}: zero_optimization.compute_grad_norm=false: the trainer's skip guard needs ZeRO's "
                          "global gradient norm to skip a step with a non-finite gradient in any parameter group; "
                          "remove the key")
    if stage == 3 and cfg.mode != "vanilla":
        raise ConfigError(f"{path}: ZeRO stage 3 is not supported {moe_backends.get(cfg.model.moe.backend).zero3}; "
                          "use stage 1 or 2")
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
    """Refuse the device/precision/backend combinations that cannot run, before any compute: what the
    backend's registry entry needs (tcd_ds/model/experts/registry.py; docs/gpu.md lists every GPU
    combination and how it is covered). The `grouped` backend is not refused in fp16 or
    fp32 on CUDA: torch 2.13's grouped_mm takes fp32/bf16/fp16 there (`_grouped_mm_validate_inputs`),
    with bf16 on SM90/SM100 on the fast kernel and everything else on its per-group mm fallback."""
    if cfg.mode == "vanilla":
        return
    precision = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
    refused = moe_backends.refusal(cfg.model.moe.backend, device.type, precision, path)
    if refused:
        raise ConfigError(refused)


def check_parallel(cfg: Config, layout: Layout) -> None:
    ep = cfg.model.moe.ep_size if cfg.mode != "vanilla" else 1
    if layout.world_size % ep:
        raise ConfigError(f"model.moe.ep_size={ep} does not divide the world size {layout.world_size}")


# --- the run, resolved once -----------------------------------------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESUME_PINNED = ("data.corpus", "data.vocab", "model.vocab_size")  # a resumed run must use the same


@dataclass(frozen=True)
class Run:
    """Everything one run uses, resolved once (`resolve_run`) and then only read: the config as used
    (frozen; data.corpus and data.vocab after the fallback and `wordpiece:N` resolution, and
    model.vocab_size of that vocab), the DeepSpeed config with its "auto" values filled, where the
    run's rank runs (layout, device, dtype), the teacher's architecture and the checkpoint the run
    resumes from. `run_config.json` records it (`record()`)."""

    cfg: Config
    ds_config: dict
    layout: Layout
    device: torch.device
    dtype: str  # bf16 | fp16 | fp32: the DeepSpeed config's precision
    teacher: ModelConfig | None  # mode tcd: the teacher's architecture (read from teacher.path)
    teacher_dir: Path | None
    resume_tag: str | None  # the checkpoint tag resumed from; None: from step 0
    resume_skipped: tuple[str, ...] = ()  # incomplete checkpoints passed over, with the reason
    lock: RunDirLock | None = None  # global rank 0: this run's hold on its run dir (tcd_ds/locks.py)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def model(self) -> ModelConfig:
        return self.cfg.student_model()

    def record(self) -> dict:
        """run_config.json: the config tree as used, plus `run`, what the environment decided."""
        return {**to_dict(self.cfg), "run": {
            "world_size": self.layout.world_size, "launcher": self.layout.launcher, "device": self.device.type,
            "dtype": self.dtype, "ds_config": self.ds_config, "resume_from": self.resume_tag,
            "teacher_dir": str(self.teacher_dir) if self.teacher_dir else None,
            "teacher": to_dict(self.teacher) if self.teacher else None}}


def ds_dtype(ds_config: dict) -> str:
    return "bf16" if ds_config.get("bf16", {}).get("enabled") else (
        "fp16" if ds_config.get("fp16", {}).get("enabled") else "fp32")


def check_data_inputs(cfg: Config) -> None:
    """Missing or malformed explicit data inputs: one line, before any compute (a missing *default*
    path falls back to bundled text instead, see data/fallback.py)."""
    if cfg.data.corpus != DataConfig().corpus:
        is_local_source(cfg.data.corpus)  # raises for a missing path; False for a hub name
    if not vocab_falls_back(cfg.data.vocab) and resolve_vocab_path(cfg.data.vocab) is not None:
        load_tokenizer(cfg.data.vocab)  # None above: a hub tokenizer name, loaded once resolved


def resolve_data(cfg: Config, layout: Layout) -> Config:
    """`cfg` with data.corpus and data.vocab as used (the bundled fallback for a missing default, the
    trained vocab for `wordpiece:N`) and, for a trained vocab, model.vocab_size of it. What is built on
    disk is built by rank 0 while the others wait at a barrier (one_rank_first: no cross-node lock)."""
    warn = warn_stderr if layout.is_main else None
    corpus, vocab = one_rank_first(lambda: resolve_sources(cfg.data.corpus, cfg.data.vocab, cfg.data.cache_dir,
                                                           warn=warn), layout)
    size = special_ids(load_tokenizer(vocab)).vocab_size
    values = {"data.corpus": corpus, "data.vocab": vocab}
    if is_fallback_vocab(vocab):
        values["model.vocab_size"] = size  # the fallback or trained vocab sets the size
    elif cfg.model.vocab_size != size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer ({vocab}) has {size} tokens")
    return with_values(cfg, values)


def resume_point(cfg: Config, resume: str) -> tuple[str | None, tuple[str, ...]]:
    """The checkpoint tag to resume from (None: start at step 0) and the incomplete ones skipped."""
    if resume == "none":
        return None, ()
    if resume != "auto":
        return resume, ()
    tag, skipped = checkpoint.find_latest(Path(cfg.run_dir) / "checkpoints")
    return tag, tuple(skipped)


def agree_on_resume(tag: str | None, ckpt_dir: Path, layout: Layout) -> str | None:
    """The checkpoint every rank resumes from. Each rank chose its own before the process group
    existed; on a shared file system a stale directory listing (NFS, Lustre) can show a rank an
    older newest checkpoint than the others see, and ranks that load different steps train on as
    if nothing happened. The ranks agree on the oldest of their choices (every rank sees it: the
    others saw newer ones), in one all-reduce; rank 0 says so in one line when they differed. A rank
    that sees no checkpoint while another resumes is an error (not a shared run dir, or a listing
    too stale to trust): one `error:` line, exit 2, rather than training from step 0 over it."""
    from tcd_ds.optim import comm_device

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tag
    step = -1.0 if tag is None else float(checkpoint.step_of(tag))
    t = torch.tensor([step, -step], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)  # (min, -max) of the ranks' steps
    low, high = int(t[0].item()), int(-t[1].item())
    if low == high:
        return tag
    if low < 0:
        raise CheckpointError(f"the ranks disagree on the run's checkpoints under {ckpt_dir}: some see none, others "
                              f"resume from step {high} (is the run dir on a file system every node shares, with "
                              "fresh listings?); resubmit once every node sees them")
    agreed = checkpoint.tag_for(low)
    if layout.is_main:
        print(f"resume: the ranks saw different newest checkpoints (steps {low} to {high}: a stale listing of a "
              f"shared file system?); every rank resumes from {agreed}", file=sys.stderr, flush=True)
    return agreed


def check_resumable(cfg: Config, tag: str, shape: bool = True, data: bool = True) -> None:
    """A resumed run has the model shape (the checkpoint's config.json) and the data sources (the
    previous run_config.json) its checkpoint was trained with."""
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    if shape:
        checkpoint.check_same_model(ckpt_dir / tag, config_to_hf(cfg.student_model()))
    previous = Path(cfg.run_dir) / "run_config.json"
    if not data or not previous.is_file():
        return
    before, now = _flat(read_json(previous)), _flat(to_dict(cfg))
    diff = [f"{k} {before.get(k)} -> {now[k]}" for k in RESUME_PINNED if k in before and before[k] != now[k]]
    if diff:
        raise CheckpointError(f"cannot resume from {ckpt_dir / tag}: the data changed since {previous} "
                              f"({', '.join(diff)}); use another run_dir or --resume none")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def resolve_run(cfg: Config, ds_path: str, resume: str, layout: Layout) -> Run:
    """The one step from (recipe + overrides, DeepSpeed JSON, environment) to the frozen `Run`. What
    can be refused without building anything is refused first, before the process group starts and
    before the run dir is touched; then the data sources are resolved (built once if they fall back)
    and what depended on them (the vocab size) is checked."""
    check_parallel(cfg, layout)
    device = device_for(layout)
    ds_config = load_ds_config(ds_path, cfg, device, layout.world_size)
    teacher = read_teacher_config(cfg.teacher.path) if cfg.mode == "tcd" else None
    deferred = vocab_falls_back(cfg.data.vocab)  # the trained/fallback vocab's size is known once built
    if teacher is not None:
        check_teacher_positions(teacher, cfg.data.max_seq_len, cfg.teacher.path)
        student = cfg.student_model()
        check_compatible(dataclasses.replace(student, vocab_size=teacher.vocab_size) if deferred else student,
                         teacher, cfg.distill)
    check_data_inputs(cfg)
    # one training per run dir, held before the resume point is chosen; a refused rank 0 exits before
    # the process group starts, and the launcher (deepspeed, srun) then ends the other ranks
    lock = RunDirLock.acquire(Path(cfg.run_dir)) if layout.is_main else None
    try:
        tag, skipped = resume_point(cfg, resume)
        if tag is not None:  # a layout DeepSpeed cannot load is refused before any compute
            checkpoint.check_same_layout(Path(cfg.run_dir) / "checkpoints" / tag, layout.world_size,
                                         ds_config.get("zero_optimization", {}).get("stage", 0),
                                         {"backend": cfg.model.moe.backend, "ep_size": cfg.model.moe.ep_size}
                                         if cfg.mode != "vanilla" else None)
        if tag is not None and not deferred:  # a changed shape is refused before any compute
            check_resumable(cfg, tag, data=False)
        device = init_distributed(layout, cfg.train.collective_timeout_s)
        agreed = agree_on_resume(tag, Path(cfg.run_dir) / "checkpoints", layout)
        if agreed != tag:
            tag = agreed
            if tag is not None and not deferred:
                check_resumable(cfg, tag, data=False)
        spanning = check_expert_groups_local(cfg.model.moe.ep_size if cfg.mode != "vanilla" else 1)
        if spanning and layout.is_main:
            print(spanning, file=sys.stderr)
        cfg = resolve_data(cfg, layout)
        if teacher is not None and deferred:
            check_compatible(cfg.student_model(), teacher, cfg.distill)
        if tag is not None:
            check_resumable(cfg, tag, shape=deferred)
    except BaseException:
        if lock:
            lock.release()
        raise
    return Run(freeze(cfg), ds_config, layout, device, ds_dtype(ds_config), teacher,
               teacher_dir(cfg.teacher.path).resolve() if teacher is not None else None, tag, skipped, lock)


# --- builders: each reads the resolved Run --------------------------------------------------

@dataclass
class Data:
    train: PackedDataset
    val: PackedDataset
    evals: dict[str, PackedDataset]  # held-out sets from elsewhere (WikiText-2, novels, ...)
    order: SampleOrder
    special: object
    vocab_size: int


def build_data(cfg: Config, layout: Layout) -> Data:
    """The token caches of the resolved data.corpus (see `resolve_data`) and of the eval sets, built by
    rank 0 while the others wait at a barrier, then reused."""
    show = layout.is_main
    tok = load_tokenizer(cfg.data.vocab)
    sp = special_ids(tok)

    def cache(source: str, **limits):
        return one_rank_first(lambda: build_token_cache(source, tok, cfg.data.cache_dir, cfg.data.max_seq_len,
                                                        progress=show, **limits), layout)

    train, val = split_train_val(cache(cfg.data.corpus, max_documents=cfg.data.max_documents or None),
                                 cfg.data.val_fraction)
    evals = {}
    for name, source in cfg.data.eval_sets().items():
        if Path(source).exists():
            evals[name] = PackedDataset(read_index(cache(source, max_sequences=cfg.data.eval_max_sequences)))
        elif show:
            print(f"eval set {name}: {source} not found, skipped", file=sys.stderr)
    order = SampleOrder(len(train), cfg.seed, layout.world_size, cfg.train.micro_batch_size, cfg.train.grad_accum)
    return Data(train, val, evals, order, sp, sp.vocab_size)


def build_model(cfg: Config, vocab_size: int | None = None) -> tuple[BertForMaskedLM, ModelConfig]:
    """The student (vanilla mode: the dense model) with the seed's initial weights (identical on
    every rank). `vocab_size`, when given, must be the config's (the tokenizer's, see `resolve_data`)."""
    model_cfg = cfg.student_model()
    if vocab_size is not None and model_cfg.vocab_size != vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} but the tokenizer ({cfg.data.vocab}) has "
                          f"{vocab_size} tokens")
    model_cfg = from_dict(ModelConfig, to_dict(model_cfg))  # the model's own (mutable) copy
    torch.manual_seed(cfg.seed)
    return BertForMaskedLM(model_cfg), model_cfg


def build_teacher(cfg: Config, model_cfg: ModelConfig, device: torch.device
                  ) -> tuple[FrozenTeacher | None, RelationObjective | None]:
    """The frozen teacher and the objective (mode tcd; `resolve_run` checked that they fit)."""
    if cfg.mode != "tcd":
        return None, None
    teacher = load_teacher(cfg.teacher.path, cfg.distill, cfg.teacher.dtype, device)
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
    optimizer, scheduler = build_optimizer(model, cfg.train)  # a skipped step does not advance the schedule
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    skip_lone_allreduce(engine, ds_config)
    wrapper = engine.optimizer
    if wrapper is not optimizer and hasattr(wrapper, "_global_grad_norm"):
        # ZeRO steps our optimizer one parameter group at a time; the skip guard decides for the whole
        # step at the first group from the norm ZeRO (or the bf16 wrapper) took over every group and rank
        optimizer.global_grad_norm = lambda: wrapper._global_grad_norm
    return engine, optimizer, scheduler


def skip_lone_allreduce(engine, ds_config: dict) -> bool:
    """Without ZeRO and with one rank, DeepSpeed's backward still "all-reduces" every gradient: it
    flattens them into buckets, reduces over a group of one and copies them back (12 % of the
    64-expert step's wall time, py-spy, 1 rank x 1 thread). That changes no value, so it is turned
    off there (`enable_backward_allreduce`, DeepSpeed's own switch). Returns whether it was."""
    import deepspeed.comm as ds_dist

    alone = not ds_dist.is_initialized() or ds_dist.get_world_size() == 1
    if alone and ds_config.get("zero_optimization", {}).get("stage", 0) == 0:
        engine.enable_backward_allreduce = False
        return True
    return False


class PhaseClock:
    """Wall seconds per phase of the timed steps (data, student, teacher, relation, backward,
    optimizer); `take()` gives their means per timed step.

    On CUDA a lap synchronizes first, so that a phase holds its kernels; at every phase of every
    micro-batch that would stall the GPU's queue, so there only the steps begun with `timed=True` are
    timed (the trainer's last step of each log window). Without a synchronization every step is."""

    PHASES = ("data", "student", "teacher", "relation", "backward", "optimizer")

    def __init__(self, device: torch.device | None = None, sync: Callable[[], None] | None = None):
        cuda = device is not None and device.type == "cuda"
        self.sync = sync or (torch.cuda.synchronize if cuda else None)
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self.steps, self.timing = 0, True
        self.mark = time.perf_counter()

    def begin(self, timed: bool) -> None:
        """A step starts (the time since the last lap, e.g. logging or saving, is no phase's)."""
        self.timing = timed or self.sync is None
        if self.timing:
            if self.sync:
                self.sync()  # the previous, untimed step's kernels are not this one's
            self.steps += 1
        self.mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        """The time since the last lap goes to `phase` (in a timed step)."""
        if not self.timing:
            return
        if self.sync:
            self.sync()
        now = time.perf_counter()
        self.seconds[phase] += now - self.mark
        self.mark = now

    def take(self) -> dict[str, float]:
        """Mean seconds per timed step of each phase since the last take; then starts over."""
        out = {k: v / max(self.steps, 1) for k, v in self.seconds.items()}
        self.seconds, self.steps = dict.fromkeys(self.PHASES, 0.0), 0
        return out


@dataclass
class Trainer:
    """The built pieces of one run (`build`) and the loop's counters."""

    run: Run
    data: Data
    model: BertForMaskedLM
    model_cfg: ModelConfig
    engine: object
    optimizer: GuardedAdamW
    scheduler: GuardedLambdaLR
    teacher: FrozenTeacher | None
    objective: RelationObjective | None
    taps: Taps | None
    monitor: Monitor | None = None
    metrics: MetricsLog | None = None
    step: int = 0
    tokens: int = 0
    skipped_total: int = 0
    in_a_row: int = 0
    step_time: float = 0.0  # seconds in steps, since this process started
    clock: PhaseClock = dataclasses.field(default_factory=PhaseClock)  # the steps' time per phase
    last: dict = dataclasses.field(default_factory=dict)  # the last logged window
    target_reached: int | None = None  # the step whose eval met train.stop_at_val_loss (the run ends there)
    last_save_seconds: float | None = None  # wall seconds of this process's last checkpoint save (rank 0)
    loss_scale: float | None = None  # fp16: DeepSpeed's loss scale after the last step (None: not fp16 / not yet)
    target_evals: dict | None = None  # that eval

    @property
    def cfg(self) -> Config:
        return self.run.cfg


def build(run: Run) -> Trainer:
    if run.layout.is_main:
        run.ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.run_dir / "run_config.json", run.record())
    try:
        data = build_data(run.cfg, run.layout)
    except (ValueError, OSError) as err:  # an empty or too short corpus, an unreadable file
        raise ConfigError(f"data: {err}") from None
    model, model_cfg = build_model(run.cfg, data.vocab_size)
    teacher, objective = build_teacher(run.cfg, model_cfg, run.device)
    engine, optimizer, scheduler = build_engine(run.cfg, model, run.ds_config)
    taps = Taps(tap_points(engine.module, run.cfg.distill.positions, run.cfg.distill.include_embeddings)) \
        if teacher else None
    return Trainer(run, data, model, model_cfg, engine, optimizer, scheduler, teacher, objective, taps)


def resume(t: Trainer) -> None:
    """Load the checkpoint `resolve_run` chose, if any: weights, optimizer, schedule, RNG, counters."""
    run = t.run
    for reason in run.resume_skipped:
        print(f"resume: skipped {reason}", file=sys.stderr) if run.layout.is_main else None
    if run.resume_tag is not None:
        client = checkpoint.resume(t.engine, run.ckpt_dir, run.resume_tag, run.layout.rank, config_to_hf(t.model_cfg))
        t.step, t.tokens = client["step"], client["tokens"]
        if run.layout.is_main:
            print(f"resume: from {run.ckpt_dir / run.resume_tag} (step {t.step})", file=sys.stderr)
            if note := warn_slow_save(run.ckpt_dir / run.resume_tag):
                print(note, file=sys.stderr, flush=True)
    t.loss_scale = fp16_loss_scale(t.engine)  # fp16: the scale the first step starts from


def start_monitor(t: Trainer) -> float:
    """TensorBoard, metrics.jsonl and the start-up lines (size, memory plan); returns the matmul peak."""
    run, cfg = t.run, t.cfg
    t.monitor = Monitor(run.run_dir, run.layout.is_main, cfg.train.max_steps, t.step)
    t.metrics = MetricsLog(run.run_dir / "metrics.jsonl", run.layout.is_main)
    if not run.layout.is_main:
        return 0.0
    dtype = DTYPES[run.dtype]
    if run.device.type == "cpu" and run.dtype == "bf16" and bf16_warning():
        t.monitor.message(bf16_warning())
    peak = measure_matmul_peak(run.device, dtype)
    t.monitor.message(f"{cfg.mode}: {num_parameters(t.model) / 1e6:.2f}M parameters "
                      f"({num_parameters(t.model, active=True) / 1e6:.2f}M active), world {run.layout.world_size}, "
                      f"{len(t.data.train)} training sequences of {cfg.data.max_seq_len}, dtype {dtype}, "
                      f"matmul peak {peak / 1e9:.1f} GFLOP/s")
    names = {v: k for k, v in DTYPES.items()}
    teacher_dtype = names[next(t.teacher.parameters()).dtype] if t.teacher else "fp16"
    t.monitor.message(format_plan(memory_plan(
        t.model_cfg, cfg.train.micro_batch_size, cfg.data.max_seq_len, run.layout.world_size,
        run.ds_config.get("zero_optimization", {}).get("stage", 0), run.dtype, run.teacher, teacher_dtype)))
    return peak


# --- batches, evaluation ----------------------------------------------------------------------

def make_batch(data: Data, dataset: PackedDataset, indices, seed: int, step: int, rank: int, micro: int,
               mlm_probability: float, device: torch.device) -> dict[str, torch.Tensor]:
    batch = dataset.get_batch(indices)
    ids, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], data.special, data.vocab_size,
                              mlm_generator(seed, step, rank, micro), mlm_probability)
    batch["input_ids"], batch["labels"] = ids, labels
    return {k: v.to(device) for k, v in batch.items()}


def make_eval_batch(data: Data, dataset: PackedDataset, indices, eval_seed: int, mlm_probability: float,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """Held-out sequences `indices`, each masked by its own generator `mlm_generator(eval_seed, j)`: the
    masks of sequence j are the same whatever the run's seed, world size, rank or micro-batch."""
    batch = dataset.get_batch(indices)
    rows = [mask_tokens(batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1], data.special,
                        data.vocab_size, mlm_generator(eval_seed, j, 0, 0), mlm_probability)
            for i, j in enumerate(indices)]
    batch["input_ids"] = torch.cat([ids for ids, _ in rows])
    batch["labels"] = torch.cat([labels for _, labels in rows])
    return {k: v.to(device) for k, v in batch.items()}


def all_mean(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Mean over ranks (for logging only): one all-reduce and one device sync for all the values,
    which may be numbers or 0-d tensors on any device."""
    keys = sorted(values)
    if not keys:
        return {}
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(()) for k in keys])
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
        batch = make_eval_batch(data, dataset, indices, cfg.data.eval_seed, cfg.data.eval_mlm_probability, device)
        out = engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=batch["labels"])
        n = out.num_masked.double()
        sums += torch.stack([out.mlm_loss.double() * n, out.correct.double(), n])
    if dist.is_initialized():
        dist.all_reduce(sums)
    engine.module.train(was_training)
    loss = (sums[0] / sums[2]).item()
    return {"mlm_loss": loss, "accuracy": (sums[1] / sums[2]).item(), "perplexity": math.exp(min(loss, 50.0))}


# --- one step -----------------------------------------------------------------------------------

class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row: the message names the step and the loss terms."""


# The loss terms, each by one name from `forward_loss` to the summary: the keys of its parts, of
# metrics.jsonl and summary.json's history, and the TensorBoard tags train/<name> (per layer:
# relation/<name>/<layer>[/<q|k|v>], from the objective's 'T/3', 'A/2/q'). Two spellings that
# tests and docs read stay derived from it here: the messages' label (`term_label`: MLM, aux, T, I,
# A) and summary.json's final-value keys (`SUMMARY_KEYS`).
TERMS = ("mlm", "aux", "L_T", "L_I", "L_A")  # also the order of the non-finite check
SUMMARY_KEYS = {"loss": "final_loss", "mlm": "final_mlm_loss", "aux": "final_aux_loss",
                "L_T": "loss_T", "L_I": "loss_I", "L_A": "loss_A"}


def term_name(objective_key: str) -> str:
    """The objective's 'T' -> 'L_T'; its per-layer 'T/3' -> 'L_T/3'."""
    return "L_" + objective_key


def term_label(name: str) -> str:
    return "MLM" if name == "mlm" else name.removeprefix("L_")


def tensorboard_tag(name: str) -> str:
    return f"relation/{name}" if "/" in name else f"train/{name}"


def describe(name: str, log_every: int) -> str:
    """The TensorBoard description of the logged value `name` (a key of `log_window`'s line)."""
    window = f"the log window (train.log_every={log_every} steps, and the run's last step)"
    if name == "lr":
        return f"learning rate of the last step of {window}"
    if name in ("tokens_per_second", "mfu"):
        return f"over {window}, all ranks together"
    if name == "tokens":
        return "tokens trained on so far, all ranks together"
    if name == "grad_norm":
        return f"global gradient norm before clipping, mean over the applied (not skipped) steps of {window}"
    if name.startswith("time_"):
        return f"seconds per timed step in phase {name[5:]}, mean over {window} and over ranks"
    return (f"mean over the applied (not skipped) steps of {window}, each the mean of its micro-batches, "
            "then over ranks")


def forward_loss(engine, batch: dict, taps: Taps | None, teacher: FrozenTeacher | None,
                 objective: RelationObjective | None, clock: PhaseClock | None = None):
    """One micro-batch forward: (loss, logged parts incl. every loss term, model output)."""
    lap = clock.lap if clock else (lambda phase: None)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    if taps:
        with taps:
            out = engine(*inputs, labels=batch["labels"])
        lap("student")
        teacher_states = teacher(*inputs)
        lap("teacher")
        rel, terms = objective(taps.captured, teacher_states, batch["attention_mask"])
        loss = out.loss + rel
        lap("relation")
    else:
        out, terms = engine(*inputs, labels=batch["labels"]), {}
        loss = out.loss
        lap("student")
    parts = {"mlm": out.mlm_loss.detach(), "aux": out.aux_loss.detach(),
             "mlm_accuracy": out.correct / out.num_masked.clamp(min=1)}
    parts.update({term_name(k): v for k, v in terms.items()})
    for s in out.moe_stats:
        parts["balance"] = parts.get("balance", 0.0) + s.balance_loss.detach() / len(out.moe_stats)
        parts["dropped"] = parts.get("dropped", 0.0) + s.dropped / len(out.moe_stats)
    parts["loss"] = loss.detach()
    return loss, parts, out


def nonfinite_terms(parts: dict, device: torch.device) -> list[str]:
    """Labels of the loss terms that are non-finite on any rank (the same list on every rank): one
    all-reduce and one device sync for all the terms."""
    values = torch.stack([torch.as_tensor(parts.get(k, 0.0), dtype=torch.float32, device=device).reshape(())
                          for k in TERMS])
    flags = (~torch.isfinite(values)).float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [term_label(k) for k, f in zip(TERMS, flags.tolist()) if f]


def stack_parts(parts: dict, keys: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """The logged parts `keys` of one micro-batch as one float64 vector on the device (no sync)."""
    return torch.stack([torch.as_tensor(parts[k], device=device).detach().to(torch.float64).reshape(())
                        for k in keys])


@dataclass
class StepResult:
    """One step. Its logged values stay on the device, unsynchronised, until the log line (`LogWindow`):
    `keys` name the entries of `values`, the step's means over its micro-batches of every part of
    `forward_loss` (every loss term, also per layer) and its global gradient norm where the engine
    has one. A skipped step has none (`values` None)."""

    keys: tuple[str, ...]
    values: torch.Tensor | None  # [len(keys)] float64 on the device
    tokens: int  # non-padding tokens this rank saw
    sample_sum: int  # a checksum of this rank's samples (a resumed run must match it)
    moe_stats: list
    bad_terms: list[str]  # labels of the non-finite terms


def fp16_loss_scale(engine) -> float | None:
    """DeepSpeed's current fp16 loss scale (its ZeRO optimizer's scaler or FP16_Optimizer's); None
    outside fp16."""
    if not getattr(engine, "fp16_enabled", lambda: False)():
        return None
    opt = engine.optimizer
    scaler = getattr(opt, "loss_scaler", None)
    scale = getattr(scaler, "cur_scale", None) if scaler is not None else getattr(opt, "cur_scale", None)
    return None if scale is None else float(scale)


def scale_explains_skip(before: float | None, after: float | None) -> bool:
    """Whether an overflow skip is fp16 dynamic loss scaling at work: the scale dropped at this step
    (it was above its minimum). A skip at the minimum scale, or any skip outside fp16, is not."""
    return before is not None and after is not None and after < before


def account_skip(t: Trainer, step: int, skipped: bool, bad_terms: list[str], scale: float | None) -> bool:
    """The non-finite protocol's count after a step: True when the step was skipped. A skip that fp16
    dynamic loss scaling explains (DeepSpeed's overflow while the scale could still drop: a too-high
    initial scale skips the first steps) is reported but not counted; any other skip counts towards
    `train.max_nonfinite_steps` in a row, which stops the run (NonFiniteError)."""
    cfg, run = t.cfg, t.run
    before, t.loss_scale = t.loss_scale, scale
    if not skipped:
        t.in_a_row = 0
        return False
    if not t.optimizer.skipped and scale_explains_skip(before, scale):
        t.monitor.message(f"step {step}: fp16 gradient overflow: step skipped, loss scale {before:g} -> {scale:g}")
        return True
    t.skipped_total, t.in_a_row = t.skipped_total + 1, t.in_a_row + 1
    what = ", ".join(bad_terms) or "gradients"
    t.monitor.message(f"step {step}: non-finite {what}: step skipped ({t.in_a_row} in a row)")
    t.monitor.scalars(step, {"train/skipped_steps": t.skipped_total})
    if t.in_a_row >= cfg.train.max_nonfinite_steps:
        raise NonFiniteError(f"stopped at step {step}: {t.in_a_row} steps in a row had non-finite {what} "
                             f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); the last "
                             f"complete checkpoint is under {run.ckpt_dir}")
    return True


def train_step(t: Trainer, step: int) -> StepResult:
    """Step `step` (1-based): its micro-batches, the optimizer step, then the non-finite protocol:
    a micro-batch with a non-finite term back-propagates an exact zero on every rank and the
    optimizer step is skipped (`GuardedAdamW`, also for non-finite gradients);
    `train.max_nonfinite_steps` skipped steps in a row stop the run."""
    cfg, run, engine, clock = t.cfg, t.run, t.engine, t.clock
    t.optimizer.begin_step()
    keys, sums, tokens, sample_sum, bad_terms, out = (), None, 0, 0, [], None
    clock.begin(timed=step % cfg.train.log_every == 0 or step == cfg.train.max_steps)  # a logged step
    for micro in range(cfg.train.grad_accum):
        indices = t.data.order.batch_indices(step - 1, micro, run.layout.rank)
        batch = make_batch(t.data, t.data.train, indices, cfg.seed, step - 1, run.layout.rank, micro,
                           cfg.data.mlm_probability, run.device)
        clock.lap("data")
        loss, parts, out = forward_loss(engine, batch, t.taps, t.teacher, t.objective, clock)
        bad = nonfinite_terms(parts, run.device)
        if bad:
            bad_terms += [b for b in bad if b not in bad_terms]
            t.optimizer.skip_requested = True
            loss = sum((p.sum() * 0.0 for p in engine.module.parameters() if p.requires_grad),
                       torch.zeros((), device=run.device))
        engine.backward(loss)
        clock.lap("backward")
        engine.step()  # the optimizer step at the accumulation boundary (DeepSpeed's ZeRO reduction with it)
        clock.lap("optimizer")
        if not bad:  # the same keys in every micro-batch and step (set by the model and the objective)
            keys = keys or tuple(sorted(parts))
            part = stack_parts(parts, keys, run.device) / cfg.train.grad_accum
            sums = part if sums is None else sums + part
        tokens += int(batch["attention_mask"].sum())
        sample_sum += int(indices.sum())
    # skipped by our guard, or by DeepSpeed's ZeRO optimizer itself (it drops a step whose global
    # gradient norm is not finite, and then does not advance the LR schedule)
    skipped = t.optimizer.skipped or bool(getattr(engine.optimizer, "overflow", False))
    if not account_skip(t, step, skipped, bad_terms, fp16_loss_scale(engine)):
        norm = engine.get_global_grad_norm()  # a tensor on the device under ZeRO: no sync here
        if norm is not None:
            keys, sums = keys + ("grad_norm",), torch.cat([sums, torch.as_tensor(
                norm, dtype=torch.float64, device=run.device).reshape(1)])
    if skipped:
        keys, sums = (), None
    return StepResult(keys, sums, tokens, sample_sum, out.moe_stats, bad_terms)


# --- logging, evaluation, saving --------------------------------------------------------------

@dataclass
class LogWindow:
    """What the steps since the last log line add up to: their logged values summed on the device
    (synchronised once, at the log line: `means`), over the steps applied (a skipped step has none)."""

    peak: float  # the matmul peak (FLOP/s; 0 on ranks other than 0 and when not measured)
    flops_per_token: float
    tokens: int = 0  # this rank's, since the last log line (the window's tok/s)
    uncounted: int = 0  # this rank's, not yet in Trainer.tokens (a checkpoint between log lines counts them)
    start: float = dataclasses.field(default_factory=time.perf_counter)
    keys: tuple[str, ...] = ()
    sums: torch.Tensor | None = None
    steps: int = 0  # applied steps in `sums`

    def add(self, result: StepResult) -> None:
        self.tokens += result.tokens
        self.uncounted += result.tokens
        if result.values is None:
            return
        if self.sums is not None and result.keys != self.keys:
            raise RuntimeError(f"the logged terms changed within a log window: {self.keys} -> {result.keys}")
        self.keys = result.keys
        self.sums = result.values.clone() if self.sums is None else self.sums + result.values
        self.steps += 1

    def means(self) -> dict[str, torch.Tensor]:
        """Each logged value's mean over the window's applied steps (0-d tensors, not synchronised)."""
        if self.sums is None:
            return {}
        mean = self.sums / self.steps
        return {k: mean[i] for i, k in enumerate(self.keys)}

    def restart(self) -> None:
        self.tokens, self.start, self.keys, self.sums, self.steps = 0, time.perf_counter(), (), None, 0


def count_tokens(t: Trainer, window: LogWindow) -> float:
    """Add every rank's uncounted tokens to `t.tokens` (a collective: every rank calls it at the same
    step) and return the window's tokens over all ranks. At each log line and before each checkpoint,
    so the tokens a checkpoint records are those of its steps, and a resumed run counts each step once."""
    world = t.run.layout.world_size
    means = all_mean({"tokens": window.tokens, "uncounted": window.uncounted}, t.run.device)
    t.tokens += round(means["uncounted"] * world)
    window.uncounted = 0
    return means["tokens"] * world


def log_window(t: Trainer, window: LogWindow, step: int, result: StepResult) -> None:
    """Every `train.log_every` steps (and the last): the window's means (over its applied steps, then
    over ranks) to TensorBoard, the progress line and metrics.jsonl; the window restarts. The
    learning rate and the expert load are the last step's (`result`); see `describe`."""
    world = t.run.layout.world_size
    logged = all_mean(window.means(), t.run.device)  # the window's one sync of its loss terms
    elapsed = time.perf_counter() - window.start
    tps = count_tokens(t, window) / elapsed
    logged.setdefault("grad_norm", 0.0)  # no applied step, or an engine without a global norm
    logged.update({"lr": t.scheduler.get_last_lr()[0], "tokens_per_second": tps, "tokens": t.tokens})
    logged.update({f"time_{k}": v for k, v in all_mean(t.clock.take(), t.run.device).items()})
    if window.peak:
        logged["mfu"] = window.flops_per_token * tps / (window.peak * world)
    t.monitor.scalars(step, {tensorboard_tag(k): v for k, v in logged.items()},
                      {tensorboard_tag(k): describe(k, t.cfg.train.log_every) for k in logged})
    log_expert_load(t.monitor, step, result.moe_stats)
    shown = {k: logged[k] for k in ("loss", *TERMS) if k in logged}
    t.monitor.progress(step, {**shown, "tok/s": tps})
    t.metrics.append("train", step, {"samples_rank0": result.sample_sum,
                                     **{k: v for k, v in logged.items() if "/" not in k}})
    t.last = logged
    window.restart()


def save_checkpoint(engine, ckpt_dir: Path, step: int, client: dict, model_config: dict, cfg: Config,
                    device: torch.device) -> Path:
    """Save on every rank; if any rank fails to write, every rank stops with one clear line and the
    previous complete checkpoint stays the one `latest` points to."""
    error = None
    try:
        layout = {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
                  "zero_stage": engine.zero_optimization_stage(),
                  **({"backend": cfg.model.moe.backend, "ep_size": cfg.model.moe.ep_size} if cfg.mode != "vanilla" else {})}
        path = checkpoint.save(engine, ckpt_dir, step, client, model_config, cfg.train.keep_checkpoints, layout)
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



def save(t: Trainer, step: int, window: LogWindow) -> Path:
    count_tokens(t, window)
    path = save_checkpoint(t.engine, t.run.ckpt_dir, step, {"step": step, "tokens": t.tokens},
                           config_to_hf(t.model_cfg), t.cfg, t.run.device)
    if t.run.layout.is_main:
        t.last_save_seconds = checkpoint.save_seconds(path)
        if t.last_save_seconds is not None:
            t.monitor.scalars(step, {"checkpoint/save_seconds": t.last_save_seconds})
    return path


def warn_slow_save(tag_dir: Path, env: dict[str, str] | None = None) -> str | None:
    """One `warning:` line when the checkpoint this job resumes from took longer to save than the
    job's signal lead leaves (TCD_SIGNAL_LEAD_S, exported by the sbatch scripts beside their
    `--signal=B:USR1@T`, minus TCD_REQUEUE_MARGIN, default 60): the next signal's save would not
    finish before the requeue deadline. None otherwise."""
    env = os.environ if env is None else env
    seconds = checkpoint.save_seconds(tag_dir)
    try:
        lead = float(env.get("TCD_SIGNAL_LEAD_S", ""))
    except ValueError:
        return None
    window = lead - float(env.get("TCD_REQUEUE_MARGIN", "60") or 60)
    if seconds is None or seconds <= window:
        return None
    return (f"warning: the last checkpoint took {seconds:.0f} s to save, more than the {window:.0f} s the signal "
            f"leaves before the requeue deadline (--signal=B:USR1@{lead:.0f} minus TCD_REQUEUE_MARGIN="
            f"{lead - window:.0f}): raise the lead in the sbatch script (and TCD_SIGNAL_LEAD_S) or save faster")


def due(every: int, step: int, last: int) -> bool:
    return bool(every) and step % every == 0 and step < last


# --- the loop ---------------------------------------------------------------------------------

def train(run: Run, stop: StopRequest | None = None) -> dict:
    """Build, resume, then for each step: batch -> step -> log -> eval -> save; then the end of the
    run (final eval, export, summary). A signal (SIGTERM/SIGUSR1) saves the step and stops."""
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    print(f"rank {run.layout.rank}/{run.layout.world_size} (local {run.layout.local_rank}) on {node}, device "
          f"{run.device}, launcher {run.layout.launcher}", file=sys.stderr, flush=True)
    stop = stop or StopRequest()
    t = build(run)
    resume(t)
    cfg, last = t.cfg, t.cfg.train.max_steps
    window = LogWindow(start_monitor(t), flops_per_token(t.model_cfg, cfg.data.max_seq_len, cfg.data.mlm_probability))
    t.clock = PhaseClock(run.device)
    interrupted = False
    try:
        t.engine.train()
        while t.step < last:
            started = time.perf_counter()
            result = train_step(t, t.step + 1)
            t.step += 1
            t.step_time += time.perf_counter() - started
            window.add(result)
            if t.step % cfg.train.log_every == 0 or t.step == last:
                log_window(t, window, t.step, result)
            stopping = stop.agreed(run.device)  # before the eval: after a signal, save at once
            if due(cfg.train.eval_every, t.step, last) and not stopping:
                evals = run_evals(t)
                t.metrics.append("eval", t.step, evals)
                if cfg.train.stop_at_val_loss > 0 and evals["val"]["mlm_loss"] <= cfg.train.stop_at_val_loss:
                    t.target_reached, t.target_evals = t.step, evals
                    t.monitor.message(f"val mlm {evals['val']['mlm_loss']:.4f} <= train.stop_at_val_loss "
                                      f"{cfg.train.stop_at_val_loss:g}: the run ends at step {t.step}")
                    break
            if stopping:
                interrupted = True
                save(t, t.step, window)
                t.monitor.message(f"signal {stop.signal}: saved step {t.step}; exiting with status {REQUEUE_EXIT} "
                                  "(requeue)")
                break
            if due(cfg.train.save_every, t.step, last):
                save(t, t.step, window)
        return finish(t, interrupted, window)
    finally:  # events written so far reach the disk, also when the run stops on an error
        t.monitor.close()
        if t.taps:
            t.taps.remove()


def finish(t: Trainer, interrupted: bool, window: LogWindow) -> dict:
    """The end of the run: (unless interrupted) the final eval, the last checkpoint and its export;
    then summary.json."""
    run = t.run
    count_tokens(t, window)  # the steps since the last log line (a run that ended at its target)
    summary = {"mode": t.cfg.mode, "steps": t.step, "tokens": t.tokens, "interrupted": interrupted,
               "target_reached": t.target_reached}
    if not interrupted:
        evals = t.target_evals  # the run ended at train.stop_at_val_loss: this step's eval is done
        if evals is None:
            evals = run_evals(t)
            t.metrics.append("eval", t.step, evals)
        final = save(t, t.step, window)
        if run.layout.is_main:
            checkpoint.export_checkpoint(final, run.run_dir / "export")
            tok_file = Path(t.cfg.data.vocab)
            if tok_file.is_file():
                (run.run_dir / "export" / "vocab.txt").write_bytes(tok_file.read_bytes())
        summary.update(eval=evals)
    summary.update({key: t.last.get(name) for name, key in SUMMARY_KEYS.items()})
    summary.update({
        "tokens_per_second": t.last.get("tokens_per_second"), "mfu": t.last.get("mfu"),
        "last_save_seconds": t.last_save_seconds,
        "step_time_s": t.step_time / max(1, t.step - t.monitor.start_step), "world_size": run.layout.world_size,
        "parameters": num_parameters(t.model), "active_parameters": num_parameters(t.model, active=True),
        "history": t.metrics.read("train"), "eval_history": t.metrics.read("eval"),
    })
    if run.layout.is_main:
        write_json_atomic(run.run_dir / "summary.json", summary)
    return summary


def run_evals(t: Trainer) -> dict[str, dict[str, float]]:
    run, data = t.run, t.data
    results = {name: evaluate(t.engine, data, dataset, t.cfg, run.layout, run.device)
               for name, dataset in {"val": data.val, **data.evals}.items()}
    for name, metrics in results.items():
        t.monitor.scalars(t.step, {f"eval/{name}/{k}": v for k, v in metrics.items()})
    t.monitor.message("eval step {}: {}".format(t.step, ", ".join(
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
        run = resolve_run(cfg, args.deepspeed_config, args.resume, layout)
    except (*USER_ERRORS, RunDirInUse) as err:
        fail(err)
    try:
        summary = train(run, stop)
    except (ConfigError, CheckpointError) as err:
        fail(err)
    except NonFiniteError as err:
        fail(err, NONFINITE_EXIT)
    finally:
        if run.lock:
            run.lock.release()
    close_ranks()
    if layout.is_main:  # where everything went
        info = (f"vanilla BERT, {run.teacher.num_layers} layers x {run.teacher.hidden_size}, frozen"
                if run.teacher else "")
        print(run_summary_block(run.run_dir, summary, run.teacher_dir, info), flush=True)
    if summary["interrupted"]:
        # `srun --kill-on-bad-exit` takes the first rank's 85 for a failure and sends the others
        # SIGTERM; at interpreter shutdown Python's handlers are gone, and that SIGTERM would kill a
        # rank that has saved and is exiting (status 143, not 85: the job would not be requeued)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        raise SystemExit(REQUEUE_EXIT)
    return summary


if __name__ == "__main__":
    main()
