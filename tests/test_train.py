"""The trainer end to end: 2 CPU ranks under the deepspeed launcher, ZeRO-2, expert parallelism;
resume after a kill -9 reproduces the uninterrupted run; bad input fails before any compute."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tcd_ds.config import ModelConfig
from tcd_ds.model.bert import BertForMaskedLM
from tcd_ds.model.hf import save_pretrained

REPO = Path(__file__).resolve().parents[1]


def quick(shared: Path, cache: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    """Overrides for a run of a few steps on a small slice of the real corpus."""
    d = shared
    return [f"data.corpus={d / 'wikipedia-en-2015'}", f"data.vocab={d / 'vocab' / 'bert-base-uncased-vocab.txt'}",
            f"data.eval_corpora=wikitext2={d / 'wikitext-2' / 'wiki.test.raw'},gutenberg={d / 'gutenberg-novels'}",
            "data.max_documents=40", "data.eval_max_sequences=16", f"data.cache_dir={cache}",
            f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
            "train.micro_batch_size=8", "train.warmup_steps=2", f"run_dir={run_dir}", *extra]


def launch(args: list[str], log: Path, ranks: int = 2, timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = ["deepspeed", "--num_accelerators", str(ranks), "--master_port", str(_port()), "tcd_ds/train.py", *args]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    return proc


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token_cache")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A vanilla BERT of the tiny recipe's shape (random weights: the plumbing is under test here)."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256, max_position=128)
    out = tmp_path_factory.mktemp("teacher")
    save_pretrained(BertForMaskedLM(cfg), cfg, out)
    return out


def read_scalars(tb_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tcd_two_ranks_zero2_expert_parallel(shared_data, cache, teacher_dir, tmp_path):
    run = tmp_path / "tcd"
    args = ["--config", "tiny", "--mode", "tcd", "--deepspeed_config", "ds_configs/cpu_zero2.json",
            *quick(shared_data, cache, run, 12, f"teacher.path={teacher_dir}", "model.moe.backend=deepspeed",
                   "model.moe.ep_size=2", "model.moe.num_experts=8", "train.lr=3e-3")]
    proc = launch(args, tmp_path / "log.txt")
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, log[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == "tcd" and summary["steps"] == 12 and summary["world_size"] == 2
    losses = [h["mlm"] for h in summary["history"]]
    assert all(map(lambda x: x == x and abs(x) < 1e6, losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses  # MLM falls
    for key in ("loss_T", "loss_I", "loss_A", "final_mlm_loss", "tokens_per_second", "tokens"):
        assert summary[key] is not None and summary[key] > 0, key
    scalars = read_scalars(run / "tensorboard")
    for tag in ("train/loss", "train/mlm", "train/aux", "train/L_T", "train/L_I", "train/L_A", "train/lr",
                "train/grad_norm", "train/tokens_per_second", "train/mfu", "relation/L_T/2", "relation/L_A/1/q",
                "experts/layer0/dropped_fraction", "eval/val/mlm_loss", "eval/gutenberg/mlm_loss"):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    assert len(scalars["train/L_T"]) == 12
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000012"
    assert (ckpt / "step_00000012" / "complete.json").is_file()
    assert len(list((ckpt / "step_00000012").glob("layer_*_expert_*_model_states.pt"))) == 2 * 8  # 2 layers x 8
    # the export gathered all 8 experts from both expert-parallel ranks
    from tcd_ds.model.hf import read_pretrained

    cfg, sd = read_pretrained(run / "export")
    assert cfg.moe.num_experts == 8 and sd["bert.encoder.layer.1.moe.experts.w1"].shape == (8, 64, 256)


def _run_until_checkpoint(args: list[str], log: Path, ckpt: Path, timeout: float = 300) -> None:
    """Start a 2-rank run and kill -9 its whole process group once `ckpt` is complete."""
    cmd = ["deepspeed", "--num_accelerators", "2", "--master_port", str(_port()), "tcd_ds/train.py", *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        try:
            while not (ckpt / "complete.json").is_file():
                assert proc.poll() is None, f"run ended before {ckpt.name}: {log.read_text()[-2000:]}"
                assert time.time() < deadline, "timed out waiting for the checkpoint"
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_resume_after_kill_matches_uninterrupted_run(shared_data, cache, tmp_path):
    base = ["--config", "tiny", "--mode", "moe", "--deepspeed_config", "ds_configs/cpu_zero2.json"]
    moe = ["model.moe.backend=deepspeed", "model.moe.ep_size=2", "model.moe.num_experts=4", "model.moe.jitter=0.1",
           "model.moe.capacity_factor=1.0"]
    straight = tmp_path / "straight"
    proc = launch(base + quick(shared_data, cache, straight, 8, *moe), tmp_path / "a.txt")
    assert proc.returncode == 0, (tmp_path / "a.txt").read_text()[-3000:]

    resumed = tmp_path / "resumed"
    args = base + quick(shared_data, cache, resumed, 8, *moe, "train.save_every=4")
    _run_until_checkpoint(args, tmp_path / "b1.txt", resumed / "checkpoints" / "step_00000004")
    proc = launch(args, tmp_path / "b2.txt")
    log = (tmp_path / "b2.txt").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "resume: from" in log and "(step 4)" in log  # the only complete checkpoint before the kill
    a = {h["step"]: h for h in json.loads((straight / "summary.json").read_text())["history"]}
    # metrics.jsonl keeps the last line per step: steps 5-8 come from the resumed process
    b = {h["step"]: h for h in json.loads((resumed / "summary.json").read_text())["history"]}
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert b[step]["samples_rank0"] == a[step]["samples_rank0"], step
        for key in ("loss", "mlm", "aux", "balance", "dropped"):
            assert abs(b[step][key] - a[step][key]) <= 1e-6, (step, key, a[step][key], b[step][key])


@pytest.mark.parametrize("override,message", [
    (["model.moe.ep_size=3", "model.moe.backend=deepspeed", "model.moe.num_experts=6"],
     "model.moe.ep_size=3 does not divide the world size 1"),
    (["trian.max_steps=3"], "unknown config key 'trian'; did you mean 'train'?"),
    (["--mode", "tcd"], "mode=tcd needs a teacher"),
])
def test_bad_input_fails_with_one_line(override, message, tmp_path):
    cmd = [sys.executable, "-m", "tcd_ds.train", "--config", "tiny", "--deepspeed_config",
           "ds_configs/cpu_zero2.json", f"run_dir={tmp_path}"]
    cmd += override if override[0].startswith("--") else ["--mode", "moe", *override]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip()[7:]}"]
    assert message in proc.stderr


def test_ds_config_validation(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    z3 = tmp_path / "z3.json"
    z3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    fp16 = REPO / "ds_configs" / "gpu_zero2_fp16.json"
    cases = [(bad, "is not valid JSON"), (z3, "ZeRO stage 3 is not supported with DeepSpeed-MoE"),
             (fp16, "fp16 is not supported on CPU")]
    for path, message in cases:
        cmd = [sys.executable, "-m", "tcd_ds.train", "--config", "tiny", "--mode", "moe", "--deepspeed_config",
               str(path), "model.moe.backend=deepspeed", f"run_dir={tmp_path}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_teacher_mismatch_fails_before_compute(tmp_path):
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position=128)
    save_pretrained(BertForMaskedLM(cfg), cfg, tmp_path / "narrow")
    for path, message in [(tmp_path / "narrow", "teacher hidden_size 32 != student hidden_size 64"),
                          (tmp_path / "missing", "does not exist")]:
        cmd = [sys.executable, "-m", "tcd_ds.train", "--config", "tiny", "--mode", "tcd", "--deepspeed_config",
               "ds_configs/cpu_zero2.json", f"teacher.path={path}", f"run_dir={tmp_path / 'run'}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert not (tmp_path / "run").exists()  # refused before the run dir or any data was touched
