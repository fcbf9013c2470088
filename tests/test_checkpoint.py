"""Checkpoint files are read as data, never as code: export and resume accept what tcd-ds and DeepSpeed
write (tensors and their checkpoint metadata) and refuse, with one line, a file that would run code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tcd_ds import checkpoint
from tcd_ds.config import build_config
from tcd_ds.model.bert import BertForMaskedLM
from tcd_ds.model.hf import CheckpointError, config_to_hf

from test_optim import OVERRIDES, _batch, _engine, world_of_one  # noqa: F401  (world_of_one: a fixture)
from trainer_utils import REPO


class _RunsCode:
    """Unpickling this creates a directory: it stands for any code a foreign checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _plant(path: Path, marker: Path) -> None:
    """Add a code-running object to the pickled dict in `path` (a copy of the original otherwise)."""
    data = torch.load(path, weights_only=False)
    data["extra"] = _RunsCode(marker)
    torch.save(data, path)


def _fake_run_dir(tmp_path: Path) -> Path:
    """A run dir with one checkpoint as DeepSpeed lays it out (dense model states only, no optimizer)."""
    cfg = build_config("tiny", OVERRIDES + ["mode=vanilla"]).student_model()
    model = BertForMaskedLM(cfg)
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "global_steps": 1, "ds_version": "0.19.8"},
               tag / "mp_rank_00_model_states.pt")
    (tag / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    (tag / "complete.json").write_text(json.dumps({"step": 1}))
    (run / "checkpoints" / "latest").write_text("step_00000001\n")
    return run


@pytest.mark.multiproc
def test_export_refuses_a_checkpoint_that_would_run_code(tmp_path):
    run = _fake_run_dir(tmp_path)
    checkpoint.export_checkpoint(run / "checkpoints" / "step_00000001", tmp_path / "ok")  # plain data: fine
    marker = tmp_path / "code-ran"
    model_file = run / "checkpoints" / "step_00000001" / "mp_rank_00_model_states.pt"
    _plant(model_file, marker)
    proc = subprocess.run([sys.executable, "-m", "tcd_ds.checkpoint", str(run), str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert not marker.exists(), "loading the checkpoint ran code"
    assert proc.returncode != 0 and not (tmp_path / "out").exists(), proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: refusing to load {model_file}: it needs posix.mkdir, not tensors or tcd-ds/DeepSpeed "
                     "checkpoint data (unpickling it could run code); only use checkpoints you wrote"], lines


@pytest.mark.slow
def test_resume_loads_real_checkpoints_and_refuses_files_that_would_run_code(world_of_one, tmp_path):
    """A checkpoint DeepSpeed and tcd-ds wrote (ZeRO-2, DeepSpeed-MoE experts, RNG states) resumes and
    exports under weights_only loading; the same checkpoint with code planted in our RNG file or in any
    of DeepSpeed's own files (model, expert, optimizer states) is refused before the code runs."""
    _, engine, _, _ = _engine(tmp_path, ["model.moe.backend=deepspeed"])
    batch = _batch(0)
    engine.backward(engine(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss)
    engine.step()
    ckpt = tmp_path / "ckpt"
    model_config = config_to_hf(engine.module.config)
    tag_dir = checkpoint.save(engine, ckpt, 1, {"step": 1, "tokens": 7}, model_config, keep=3)
    saved = {k: v.clone() for k, v in engine.module.state_dict().items()}

    _, fresh, _, _ = _engine(tmp_path, ["model.moe.backend=deepspeed"])
    torch.manual_seed(99)
    client = checkpoint.resume(fresh, ckpt, tag_dir.name, 0, model_config)
    assert client["step"] == 1 and client["tokens"] == 7
    assert all(torch.equal(fresh.module.state_dict()[k], v) for k, v in saved.items())
    checkpoint.export_checkpoint(tag_dir, tmp_path / "export")

    files = {"our RNG state": tag_dir / "rng_rank00000.pt", "model states": tag_dir / "mp_rank_00_model_states.pt",
             "expert states": tag_dir / "layer_0_expert_1_mp_rank_00_model_states.pt",
             "optimizer states": next(tag_dir.glob("*optim_states.pt"))}
    for what, path in files.items():
        original = path.read_bytes()
        marker = tmp_path / f"code-ran-{path.stem}"
        _plant(path, marker)
        try:
            with pytest.raises(CheckpointError) as err:
                checkpoint.resume(fresh, ckpt, tag_dir.name, 0, model_config)
            assert not marker.exists(), f"loading the {what} ran code"
            assert str(err.value).startswith(f"refusing to load {path}: it needs posix.mkdir"), what
            assert "\n" not in str(err.value)
        finally:
            path.write_bytes(original)


def test_rotation_deletes_cut_off_saves_older_than_the_new_checkpoint(tmp_path):
    """A save cut off by a crash or kill (no complete.json) used to stay on disk for good: only complete
    checkpoints were rotated. Now every cut-off one older than the checkpoint just completed goes too;
    a newer cut-off one (the run resumed from before it) stays until its step is saved again."""
    def make(step, complete):
        d = tmp_path / checkpoint.tag_for(step)
        d.mkdir()
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if complete:
            (d / checkpoint.COMPLETE).write_text(json.dumps({"step": step}))

    for step, complete in ((10, True), (15, False), (20, True), (25, False), (30, True), (40, False)):
        make(step, complete)
    gone = checkpoint.rotate(tmp_path, keep=2, step=30)
    assert gone == ["step_00000010", "step_00000015", "step_00000025"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000020", "step_00000030", "step_00000040"]


def _saved(tmp_path, name, ranks, zero, layout=None, experts=False):
    d = tmp_path / name
    d.mkdir()
    for r in range(ranks):
        (d / f"rng_rank{r:05d}.pt").write_bytes(b"x")
        if zero:
            (d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    if experts:
        (d / "layer_0_expert_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    (d / checkpoint.COMPLETE).write_text(json.dumps({"step": 1, **({"layout": layout} if layout else {})}))
    return d


@pytest.mark.parametrize("saved, now, why", [
    ((2, True, None, False), (1, 2, "torch", 1), "world size 2 -> 1 under ZeRO"),
    ((2, True, None, False), (2, 0, "torch", 1), "ZeRO (2 partitions) -> none (stage 0)"),
    ((1, False, None, False), (1, 2, "torch", 1), "no ZeRO (stage 0) -> ZeRO-2"),
    ((2, True, {"backend": "deepspeed", "ep_size": 2}, True), (2, 2, "deepspeed", 1), "model.moe.ep_size 2 -> 1"),
    ((2, True, None, True), (2, 2, "torch", 1), "model.moe.backend deepspeed -> torch"),
    ((2, True, {"backend": "torch", "ep_size": 1}, False), (2, 2, "deepspeed", 2), "model.moe.backend torch -> deepspeed"),
    ((2, True, {"backend": "torch", "ep_size": 1}, False), (2, 2, "grouped", 1), None),  # the same tensors
    ((1, False, None, False), (1, 0, "torch", 1), None),
    ((2, True, None, False), (2, 1, None, None), None),  # ZeRO-2 -> ZeRO-1 on as many ranks: DeepSpeed loads it
])
def test_a_resume_in_another_layout_is_refused_in_one_line(tmp_path, saved, now, why):
    """Issue 27: a resume that changes the world size under ZeRO, ZeRO itself, ep_size or the expert
    layout died in DeepSpeed with a traceback (measured: "Automatic adjustment of ZeRO's optimizer state
    partitioning with a new world size is not currently supported"); now one line naming what changed."""
    ranks, zero, layout, experts = saved
    d = _saved(tmp_path, "step_00000001", ranks, zero, layout, experts)
    world, stage, backend, ep = now
    moe = {"backend": backend, "ep_size": ep} if backend else None
    if why is None:
        checkpoint.check_same_layout(d, world, stage, moe)
        return
    with pytest.raises(CheckpointError) as err:
        checkpoint.check_same_layout(d, world, stage, moe)
    assert why in str(err.value) and "\n" not in str(err.value)
