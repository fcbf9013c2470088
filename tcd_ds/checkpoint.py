"""Checkpoints: save, find the latest complete one, resume (with every RNG), and export.

Layout under `<run_dir>/checkpoints/`:
    step_00000100/            one DeepSpeed checkpoint (model, optimizer, scheduler, experts)
        rng_rank00000.pt      python / numpy / torch RNG states of each rank
        config.json           the model's Hugging Face-style config (for export)
        complete.json         written by rank 0 after every rank finished saving
    latest                    the tag of the newest complete checkpoint, replaced atomically

A checkpoint without `complete.json` (cut off mid-write) is never chosen on resume. The last
`keep` complete checkpoints are kept.

Export reads the checkpoint *files*, not the live model, so it works for any backend and for a
checkpoint saved at any ep_size: DeepSpeed writes each expert to its own file
(`layer_<L>_expert_<E>_mp_rank_00_model_states.pt`, global expert ids), and DeepSpeed's
`zero_to_fp32.py` does not handle those; we gather them into the canonical expert layout ourselves.

Every `.pt` file of a checkpoint is read with `torch.load(..., weights_only=True)` (`safe_load`): tensors,
plain containers and the few classes DeepSpeed's and our files hold (`safe_globals()`), nothing that runs
code. That covers export (`python -m tcd_ds.checkpoint`) and resume: our RNG files, and DeepSpeed's own
model, expert and optimizer files, whose loads `resume` routes through `safe_load` too (DeepSpeed itself
unpickles them with `weights_only=False`). A file holding anything else is refused with one line.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tcd_ds.atomic import write_text_atomic
from tcd_ds.model.hf import CheckpointError, config_from_hf, save_pretrained

LATEST = "latest"
COMPLETE = "complete.json"
_TAG = re.compile(r"^step_(\d+)$")
# DeepSpeed MoE keys (see tcd_ds/model/experts/expert_parallel.py) -> canonical keys
_DS_GATE = re.compile(r"^(.*)\.moe\.deepspeed_moe\.gate\.wg\.weight$")
_DS_EXPERT = re.compile(r"^(.*)\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(fc1|fc2)\.(weight|bias)$")


def safe_globals() -> list:
    """The non-tensor classes a tcd-ds checkpoint's `.pt` files hold: numpy's RNG state arrays
    (`rng_rank*.pt`) and DeepSpeed's optimizer-state metadata (loss scaler, ZeRO stage, fragment
    addresses), as deepspeed 0.19.8 writes them."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location=None):
    """`torch.load` with `weights_only=True` and `safe_globals()` allowed; a file that needs any other
    global (that could run code when unpickled) raises CheckpointError, one line naming it."""
    import pickle

    with torch.serialization.safe_globals(safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL ([\w.]+)", str(err))  # "Unsupported global: GLOBAL x" or "unsupported GLOBAL x"
            what = f"it needs {found.group(1)}" if found else str(err).strip().splitlines()[0]
            raise CheckpointError(f"refusing to load {path}: {what}, not tensors or tcd-ds/DeepSpeed checkpoint "
                                  "data (unpickling it could run code); only use checkpoints you wrote") from None


class _SafeLoads:
    """Within the block, DeepSpeed's checkpoint engine reads every file with `safe_load`."""

    def __init__(self, engine):
        self.checkpoint_engine = getattr(engine, "checkpoint_engine", None)

    def __enter__(self):
        if self.checkpoint_engine is not None:
            self.checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location)

    def __exit__(self, *exc):
        if self.checkpoint_engine is not None:
            del self.checkpoint_engine.load  # the class's own method again


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    """The step of a checkpoint tag (`step_00000500` -> 500); a tag not of that form is a CheckpointError."""
    m = _TAG.match(Path(tag).name)
    if not m:
        raise CheckpointError(f"{tag!r} is not a checkpoint tag (step_<N>)")
    return int(m.group(1))


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, client_state: dict, model_config: dict, keep: int,
         layout: dict | None = None) -> Path:
    """Collective: every rank saves its part, then rank 0 marks the checkpoint complete (with the
    save's seconds and the training `layout`: world size, ZeRO stage, MoE backend and ep_size)."""
    import torch.distributed as dist

    tag = tag_for(step)
    started = time.perf_counter()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank:05d}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        (ckpt_dir / tag / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
        # seconds: the save's wall time (every rank's write and the barrier), for the next job's
        # check against its signal lead (train.warn_slow_save)
        write_text_atomic(ckpt_dir / tag / COMPLETE, json.dumps(
            {"step": step, "time": time.time(), "seconds": round(time.perf_counter() - started, 3),
             **({"layout": layout} if layout else {})}) + "\n")
        write_text_atomic(ckpt_dir / LATEST, tag + "\n")
        rotate(ckpt_dir, keep, step)
    if dist.is_initialized():
        dist.barrier()
    return ckpt_dir / tag


def rotate(ckpt_dir: Path, keep: int, step: int) -> list[str]:
    """After the checkpoint of `step` is complete: delete the complete ones beyond the newest `keep`,
    and every cut-off one (a save a crash or a kill interrupted: no complete.json) older than `step`,
    which nothing will ever finish or load. Returns the tags deleted."""
    gone = [old for old, _ in complete_checkpoints(ckpt_dir)[:-keep]]
    for d in Path(ckpt_dir).glob("step_*"):
        m = _TAG.match(d.name)
        if m and int(m.group(1)) < step and not (d / COMPLETE).is_file():
            gone.append(d.name)
    for tag in gone:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    return sorted(gone)


def save_seconds(tag_dir: Path) -> float | None:
    """The wall seconds the save of a complete checkpoint took (None: not recorded, before 2026-12-08)."""
    try:
        return float(json.loads((Path(tag_dir) / COMPLETE).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[str, int]]:
    """(tag, step) of every complete checkpoint, oldest first."""
    found = []
    for d in Path(ckpt_dir).glob("step_*"):
        m = _TAG.match(d.name)
        if m and (d / COMPLETE).is_file():
            found.append((d.name, int(m.group(1))))
    return sorted(found, key=lambda x: x[1])


def find_latest(ckpt_dir: Path) -> tuple[str | None, list[str]]:
    """The newest complete checkpoint's tag, and why each newer directory was skipped."""
    skipped = []
    for d in sorted(Path(ckpt_dir).glob("step_*"), reverse=True):
        if not _TAG.match(d.name):
            continue
        if (d / COMPLETE).is_file():
            return d.name, skipped
        skipped.append(f"{d.name} (incomplete: no {COMPLETE})")
    return None, skipped


def check_same_model(tag_dir: Path, model_config: dict) -> None:
    """Refuse to resume a checkpoint saved for another model shape (one line naming the differences)."""
    saved_file = tag_dir / "config.json"
    if not saved_file.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} has no config.json: not a tcd-ds checkpoint")
    saved = json.loads(saved_file.read_text())
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size")
    diff = [f"{k} {saved.get(k)} -> {model_config.get(k)}" for k in keys if saved.get(k) != model_config.get(k)]
    old_moe, new_moe = saved.get("tcd_moe") or {}, model_config.get("tcd_moe") or {}
    diff += [f"moe.{k} {old_moe.get(k)} -> {new_moe.get(k)}" for k in ("num_experts", "moe_every")
             if old_moe.get(k) != new_moe.get(k)]
    if diff:
        raise CheckpointError(f"cannot resume from {tag_dir}: the model shape changed ({', '.join(diff)}); "
                              "use another run_dir or --resume none")


SAME_LAYOUT_BACKENDS = ({"torch", "grouped"},)  # backends whose parameters are the same tensors (loop.py's)


def saved_layout(tag_dir: Path) -> dict[str, Any]:
    """How a checkpoint was partitioned: from its files, `world_size` (one rng_rank file per rank),
    `zero_partitions` (one ZeRO optimizer-state file per data-parallel rank; 0: saved without ZeRO)
    and whether DeepSpeed-MoE wrote per-expert files; `backend` and `ep_size` as complete.json's
    `layout` recorded them (checkpoints since 2026-12-08; None before, except a `deepspeed` backend
    seen by its expert files)."""
    tag_dir = Path(tag_dir)
    try:
        recorded = json.loads((tag_dir / COMPLETE).read_text()).get("layout") or {}
    except (OSError, ValueError):
        recorded = {}
    experts = next(tag_dir.glob("layer_*_expert_*_model_states.pt"), None) is not None
    return {"world_size": len(list(tag_dir.glob("rng_rank*.pt"))),
            "zero_partitions": len(list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))),
            "backend": recorded.get("backend") or ("deepspeed" if experts else None),
            "ep_size": recorded.get("ep_size")}


def check_same_layout(tag_dir: Path, world_size: int, zero_stage: int, moe: dict | None) -> None:
    """Refuse, in one line naming what changed, a resume DeepSpeed cannot load: another world size
    under ZeRO (its optimizer state is partitioned by rank: DeepSpeed stops with "Automatic adjustment
    of ZeRO's optimizer state partitioning with a new world size is not currently supported" and a
    traceback), ZeRO on one side only, another expert-parallel size, or a backend whose parameters
    are other tensors (deepspeed's per-expert fc1/fc2 against torch/grouped's stacked w1/w2)."""
    tag_dir = Path(tag_dir)
    saved, diff = saved_layout(tag_dir), []
    zero_now = zero_stage > 0
    if saved["zero_partitions"] and not zero_now:
        diff.append(f"ZeRO ({saved['zero_partitions']} partitions) -> none (stage 0)")
    elif not saved["zero_partitions"] and zero_now and saved["world_size"]:
        diff.append(f"no ZeRO (stage 0) -> ZeRO-{zero_stage}")
    elif saved["zero_partitions"] and saved["zero_partitions"] != world_size:
        diff.append(f"world size {saved['zero_partitions']} -> {world_size} under ZeRO")
    if moe:
        if saved["ep_size"] is not None and saved["ep_size"] != moe.get("ep_size", 1):
            diff.append(f"model.moe.ep_size {saved['ep_size']} -> {moe.get('ep_size', 1)}")
        pair = {saved["backend"], moe.get("backend")}
        if saved["backend"] and len(pair) > 1 and not any(pair <= same for same in SAME_LAYOUT_BACKENDS):
            diff.append(f"model.moe.backend {saved['backend']} -> {moe.get('backend')}")
        elif saved["backend"] is None and moe.get("backend") == "deepspeed":
            diff.append("model.moe.backend torch or grouped -> deepspeed")
    if diff:
        raise CheckpointError(f"cannot resume from {tag_dir}: it was saved with another layout ({', '.join(diff)}), "
                              "which DeepSpeed cannot load; resume with the settings it was saved with (the same "
                              "--deepspeed_config, ranks and model.moe), or start another run_dir")


def resume(engine, ckpt_dir: Path, tag: str, rank: int, model_config: dict) -> dict:
    """Load model, optimizer, scheduler and this rank's RNG; returns the client state."""
    if not (ckpt_dir / tag / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir / tag} is not complete (no {COMPLETE})")
    check_same_model(ckpt_dir / tag, model_config)
    rng_file = ckpt_dir / tag / f"rng_rank{rank:05d}.pt"
    rng = safe_load(rng_file) if rng_file.is_file() else None
    with _SafeLoads(engine):
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    if rng is not None:
        set_rng_state(rng)
    return client


# --- export ---------------------------------------------------------------------------------

def gather_canonical(tag_dir: Path) -> dict[str, torch.Tensor]:
    """All weights of a DeepSpeed checkpoint directory in canonical (Hugging Face-named) form."""
    model_files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not model_files:
        raise CheckpointError(f"{tag_dir} holds no mp_rank_*_model_states.pt")
    sd = dict(safe_load(model_files[0], map_location="cpu")["module"])
    experts: dict[str, dict[tuple[str, str], dict[int, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    for f in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_*_model_states.pt")):
        for key, value in safe_load(f, map_location="cpu").items():
            m = _DS_EXPERT.match(key)
            if not m:
                raise CheckpointError(f"unexpected expert weight {key} in {f.name}")
            prefix, e, fc, kind = m.groups()
            experts[prefix][(fc, kind)][int(e)] = value
    out = {}
    for key, value in sd.items():
        m = _DS_GATE.match(key)
        out[f"{m.group(1)}.router.weight" if m else key] = value
    for prefix, parts in experts.items():
        ids = sorted(parts[("fc1", "weight")])
        if ids != list(range(len(ids))):
            raise CheckpointError(f"{tag_dir}: experts of {prefix} are incomplete (found ids {ids[:8]}...)")
        stack = lambda fc, kind: torch.stack([parts[(fc, kind)][e] for e in ids])  # noqa: E731
        out[f"{prefix}.experts.w1"] = stack("fc1", "weight").transpose(1, 2)
        out[f"{prefix}.experts.b1"] = stack("fc1", "bias")
        out[f"{prefix}.experts.w2"] = stack("fc2", "weight").transpose(1, 2)
        out[f"{prefix}.experts.b2"] = stack("fc2", "bias")
    return out


def export_checkpoint(tag_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face-style directory (config.json + model.safetensors, fp32) from a checkpoint."""
    from tcd_ds.model.bert import BertForMaskedLM
    from tcd_ds.model.hf import load_hf_state_dict

    tag_dir = Path(tag_dir)
    cfg = config_from_hf(json.loads((tag_dir / "config.json").read_text()))
    cfg.moe.backend, cfg.moe.ep_size = "torch", 1
    model = BertForMaskedLM(cfg)
    load_hf_state_dict(model, {k: v.float() for k, v in gather_canonical(tag_dir).items()})
    return save_pretrained(model, cfg, out_dir)


def main(argv: list[str] | None = None) -> None:
    """`python -m tcd_ds.checkpoint <checkpoint dir or run dir> <out dir>`: export to HF layout."""
    from tcd_ds.cli import Parser, fail

    p = Parser(prog="python -m tcd_ds.checkpoint", description="Export a checkpoint to a Hugging Face-style "
               "directory (config.json + model.safetensors, fp32, experts gathered).")
    p.add_argument("source", help="a checkpoint tag dir, a run dir, or its checkpoints/ dir (latest complete)")
    p.add_argument("out", help="the export directory to write")
    args = p.parse_args(argv)
    src = Path(args.source)
    if not src.exists():
        fail(f"{src} does not exist")
    if (src / "checkpoints").is_dir():
        src = src / "checkpoints"
    if not (src / COMPLETE).is_file():
        tag, _ = find_latest(src)
        if tag is None:
            fail(f"no complete checkpoint under {src}")
        src = src / tag
    try:
        print(export_checkpoint(src, args.out))
    except (CheckpointError, OSError) as err:
        fail(err)


if __name__ == "__main__":
    main()
