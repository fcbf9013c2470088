"""The trainer end to end: 2 CPU ranks under the deepspeed launcher, ZeRO-2, expert parallelism, and
bad input refused before any compute (resume and faults: test_reliability.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tcd_ds.config import ModelConfig
from tcd_ds.model.bert import BertForMaskedLM
from tcd_ds.model.hf import save_pretrained

from trainer_utils import REPO, clean_launch_env, launch, quick

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token_cache")




def read_scalars(tb_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
@pytest.mark.multiproc
def test_tcd_two_ranks_zero2_expert_parallel(shared_data, cache, tiny_teacher, tmp_path):
    run = tmp_path / "tcd"
    args = ["--config", "tiny", "--mode", "tcd", "--deepspeed_config", "ds_configs/cpu_zero2.json",
            *quick(shared_data, cache, run, 12, f"teacher.path={tiny_teacher}", "model.moe.backend=deepspeed",
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
    from tcd_ds.train import PhaseClock

    for h in summary["history"]:  # where each step's time went: every phase of a TCD step took some
        assert all(h[f"time_{p}"] > 0 for p in PhaseClock.PHASES), h
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


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("override,message", [
    (["model.moe.ep_size=3", "model.moe.backend=deepspeed", "model.moe.num_experts=6"],
     "model.moe.ep_size=3 does not divide the world size 1"),
    (["trian.max_steps=3"], "unknown config key 'trian.max_steps'; did you mean 'train.max_steps'?"),
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


@pytest.mark.slow
@pytest.mark.multiproc
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


def test_deepspeed_config_auto_is_the_faster_one_for_this_device(monkeypatch, tmp_path):
    import torch

    from tcd_ds import hardware
    from tcd_ds.config import build_config
    from tcd_ds.train import load_ds_config

    monkeypatch.chdir(tmp_path)  # found beside the package, not only from the repo root
    # (flags, mode, ranks) -> (bf16, ZeRO stage): MoE stays fp32 on AMX CPUs, one rank runs without ZeRO
    cases = {(("avx512_bf16",), "moe", 2): (True, 2), (("amx_bf16",), "moe", 2): (None, 2),
             (("amx_bf16",), "vanilla", 2): (True, 2), (("amx_bf16",), "vanilla", 1): (True, 0),
             (("amx_bf16",), "tcd", 1): (None, 0), (("avx2",), "vanilla", 2): (None, 2),
             (("amx_bf16",), "moe-deepspeed", 2): (True, 2)}  # DeepSpeed-MoE's padded experts: bf16 pays
    for (flags, mode, ranks), (bf16, stage) in cases.items():
        monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None, f=flags: frozenset(f))
        backend = ["model.moe.backend=deepspeed", "model.moe.ep_size=2"] if mode == "moe-deepspeed" else []
        mode = mode.split("-")[0]
        cfg = build_config("tiny", [f"mode={mode}", *(["teacher.path=t"] if mode == "tcd" else []), *backend])
        ds = load_ds_config("auto", cfg, torch.device("cpu"), ranks)
        assert ds.get("bf16", {}).get("enabled") is bf16 and ds["zero_optimization"]["stage"] == stage, (flags, mode)
        assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size


@pytest.mark.slow
@pytest.mark.multiproc
def test_teacher_mismatch_fails_before_compute(tmp_path):
    # a narrower teacher is fine for T and I (relations are L x L); per-head A needs the head counts to match
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position=128)
    save_pretrained(BertForMaskedLM(cfg), cfg, tmp_path / "narrow")
    for path, message in [(tmp_path / "narrow", "error: teacher num_heads 4 != student num_heads 2: A aligns per "
                           "attention head; set distill.relation_heads to a number of relation heads dividing both "
                           "hidden sizes (64, 32)"),
                          (tmp_path / "missing", "does not exist")]:
        cmd = [sys.executable, "-m", "tcd_ds.train", "--config", "tiny", "--mode", "tcd", "--deepspeed_config",
               "ds_configs/cpu_zero2.json", f"teacher.path={path}", f"run_dir={tmp_path / 'run'}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert not (tmp_path / "run").exists()  # refused before the run dir or any data was touched


@pytest.mark.slow
@pytest.mark.multiproc
def test_every_run_ends_with_one_summary_block(shared_data, cache, tiny_teacher, tmp_path):
    """Rank 0 prints where everything went (and, for TCD, the teacher it used) on stdout."""
    run = tmp_path / "tcd"
    cmd = [sys.executable, "-m", "tcd_ds.train", "--config", "tiny", "--mode", "tcd", "--deepspeed_config",
           "ds_configs/cpu_zero2.json", *quick(shared_data, cache, run, 2, f"teacher.path={tiny_teacher}")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    block = proc.stdout[proc.stdout.index("run finished:"):].splitlines()[:6]
    assert block == ["run finished: tcd, 2 steps, world 1:",
                     f"  run dir      {run}",
                     f"  export       {run / 'export'}",
                     f"  summary      {run / 'summary.json'}",
                     f"  tensorboard  tensorboard --logdir {run / 'tensorboard'}",
                     f"  teacher      {tiny_teacher.resolve()} (vanilla BERT, 2 layers x 64, frozen)"], proc.stdout
    assert proc.stdout.count("run finished:") == 1
    assert (run / "export" / "config.json").is_file() and (run / "summary.json").is_file()
    assert "untested optimizer" not in proc.stdout + proc.stderr  # expected here: filtered (monitor.py)



@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("target, steps", [(1000.0, 2), (0.001, 4)])
def test_stop_at_val_loss_ends_the_run_complete_at_the_first_eval_that_meets_it(shared_data, cache, tmp_path,
                                                                               target, steps):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "tcd_ds.train", "--config", "tiny", "--mode", "vanilla", "--deepspeed_config",
           "ds_configs/cpu_zero2.json", *quick(shared_data, cache, run, 4, "train.eval_every=2", "train.log_every=3",
                                               f"train.stop_at_val_loss={target}")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps and not summary["interrupted"]
    assert summary["target_reached"] == (2 if steps == 2 else None)
    assert [e["step"] for e in summary["eval_history"]] == [2, 4][:steps // 2], "one eval a step, none repeated"
    assert summary["eval"]["val"] == {k: v for k, v in summary["eval_history"][-1]["val"].items()}
    assert (run / "export" / "config.json").is_file() and (run / "checkpoints" / f"step_{steps:08d}").is_dir()
    assert ("the run ends at step 2" in proc.stdout + proc.stderr) == (steps == 2)
    assert summary["tokens"] == steps * 8 * 64  # steps after the last log line counted (packed: no padding)


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_checkpoint_between_log_lines_records_the_tokens_of_its_steps(shared_data, cache, tmp_path):
    """A resumed run starts from the checkpoint's token count: it must include the steps since the
    last log line (it lacked them: a run resumed from step 161 of a 50-step log cadence counted 11
    steps too few)."""
    import torch

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "tcd_ds.train", "--config", "tiny", "--mode", "vanilla", "--deepspeed_config",
           "ds_configs/cpu_zero2.json", *quick(shared_data, cache, run, 8, "train.log_every=5", "train.save_every=3",
                                               "train.keep_checkpoints=5")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_step = 8 * 64  # micro-batch 8 x 64 packed tokens
    assert json.loads((run / "summary.json").read_text())["tokens"] == 8 * per_step
    for step in (3, 6):
        state = torch.load(run / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt",
                           weights_only=True, map_location="cpu")
        assert (state["step"], state["tokens"]) == (step, step * per_step)


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_finished_rank_closes_its_process_group(shared_data, cache, tmp_path):
    """Left to interpreter exit, the communicators' teardown aborted a correct 2-rank bf16 run
    ('terminate called without an active exception', exit 250) in 2 of 3 tries on an AMX CPU."""
    args = ["--config", "tiny", "--mode", "vanilla", "--deepspeed_config", "ds_configs/cpu_zero2.json",
            *quick(shared_data, cache, tmp_path / "run", 2)]
    code = ("import sys, torch.distributed as d, tcd_ds.train as t; t.main(sys.argv[1:]); "
            "print('process group after main:', d.is_initialized())")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process group after main: False" in proc.stdout, proc.stdout[-2000:]

def test_summary_block_of_an_interrupted_run():
    from tcd_ds.monitor import run_summary_block

    text = run_summary_block("runs/x", {"mode": "moe", "steps": 7, "interrupted": True, "world_size": 2})
    assert text.splitlines()[0] == "run stopped at step 7 (moe; saved, rerun the same command to resume):"
    assert "  export       none yet (written when the run completes)" in text and "teacher" not in text


@pytest.mark.slow
def test_bf16_on_cpu_trains_like_fp32_over_50_steps(shared_data, cache, tmp_path):
    """ds_configs/cpu_zero2_bf16.json: the same 50 steps as fp32 (same data, masks and init), MLM loss
    within 0.05 nats of fp32's at every logged window (measured: <= 0.002 on tiny, 8 experts), and
    really in bf16 (the trainer says so, and the losses are not bit-identical)."""
    mlm, logs = {}, {}
    for name in ("cpu_zero2", "cpu_zero2_bf16"):
        run = tmp_path / name
        cmd = [sys.executable, "-m", "tcd_ds.train", "--config", "tiny", "--mode", "moe", "--deepspeed_config",
               f"ds_configs/{name}.json",
               *quick(shared_data, cache, run, 50, "train.log_every=5", "model.moe.num_experts=8",
                      "data.max_seq_len=32", "data.eval_corpora=")]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[name] = proc.stdout + proc.stderr
        mlm[name] = [h["mlm"] for h in json.loads((run / "summary.json").read_text())["history"]]
    assert "dtype torch.float32" in logs["cpu_zero2"] and "dtype torch.bfloat16" in logs["cpu_zero2_bf16"]
    fp32, bf16 = mlm["cpu_zero2"], mlm["cpu_zero2_bf16"]
    assert len(fp32) == len(bf16) == 10 and fp32[-1] < fp32[0] - 0.5  # it learns
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) <= 0.05, (fp32, bf16)
    assert fp32 != bf16


def test_phase_clock_times_only_the_logged_steps_where_a_lap_synchronizes(monkeypatch):
    from tcd_ds import train as tr

    now = iter(float(x) for x in range(1000))
    monkeypatch.setattr(tr.time, "perf_counter", lambda: next(now))
    syncs = []
    clock = tr.PhaseClock(sync=lambda: syncs.append(1))  # a GPU: every lap would wait for its kernels
    for timed in (False, False, True):
        clock.begin(timed)
        clock.lap("data")
        clock.lap("student")
    assert len(syncs) == 3  # begin + two laps of the timed step, none in the two others
    assert clock.take() == {**dict.fromkeys(tr.PhaseClock.PHASES, 0.0), "data": 1.0, "student": 1.0}
    cpu = tr.PhaseClock(tr.torch.device("cpu"))  # no synchronization: every step is timed, means per step
    for timed in (False, True):
        cpu.begin(timed)
        cpu.lap("data")
    assert cpu.take()["data"] == 1.0 and cpu.steps == 0


def test_a_teacher_shorter_than_the_sequences_is_refused_before_compute(monkeypatch, capsys, tmp_path):
    """A teacher with max_position below data.max_seq_len used to be accepted and to fail in its
    forward (IndexError on CPU; on GPU a device-side assert that takes NCCL down): one `error:` line
    naming both values, before the run dir or any data is touched."""
    from tcd_ds import train as tr

    cfg = ModelConfig(vocab_size=30522, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256,
                      max_position=32)
    save_pretrained(BertForMaskedLM(cfg), cfg, tmp_path / "short")
    monkeypatch.setattr(tr, "StopRequest", lambda: None)  # leave pytest's signal handlers alone
    clean_launch_env(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        tr.main(["--config", "tiny", "--mode", "tcd", "--deepspeed_config", "ds_configs/cpu_zero2.json",
                 f"teacher.path={tmp_path / 'short'}", "data.max_seq_len=64", f"run_dir={run}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "max_position=32" in err[0] and "data.max_seq_len=64" in err[0], err
    assert not run.exists()


def _tiny_moe(shared_data: Path, cache: Path, run: Path, steps: int, *extra: str) -> list[str]:
    """A few steps of a very small MoE model in this process (~1 s a run after the token cache)."""
    return ["--config", "tiny", "--mode", "moe", "--deepspeed_config", "ds_configs/cpu_zero0.json",
            *quick(shared_data, cache, run, steps, "data.eval_corpora=", "model.moe.num_experts=4",
                   "data.max_seq_len=32", "train.micro_batch_size=4", "model.hidden_dropout=0",
                   "model.attention_dropout=0", *extra)]


def test_a_log_line_holds_its_windows_means(shared_data, cache, tmp_path, monkeypatch):
    """log_window logs each value's mean over the window's steps (it logged the last step's), so do
    TensorBoard (with the tag's description saying so), metrics.jsonl and summary.json's final_*."""
    from tcd_ds import train as tr

    from trainer_utils import train_in_process

    seen, real = [], tr.forward_loss
    def forward_loss(*args, **kwargs):  # one micro-batch a step: each step's own values
        loss, parts, out = real(*args, **kwargs)
        seen.append({k: float(parts[k]) for k in ("loss", "mlm", "aux", "balance")})
        return loss, parts, out

    monkeypatch.setattr(tr, "forward_loss", forward_loss)
    run = tmp_path / "run"
    summary = train_in_process(_tiny_moe(shared_data, cache, run, 5, "train.log_every=3",
                                         "train.lr=3e-3", "train.warmup_steps=1"), monkeypatch)
    assert len(seen) == 5
    window = {1: seen[0:3], 2: seen[3:5]}  # steps 1-3 (logged at 3) and 4-5 (the last step)
    history = summary["history"]
    assert [h["step"] for h in history] == [3, 5]
    for h, steps in zip(history, window.values()):
        for k in ("loss", "mlm", "aux", "balance"):
            mean = sum(s[k] for s in steps) / len(steps)
            assert h[k] == pytest.approx(mean, rel=1e-6, abs=1e-9), (h["step"], k)
    assert abs(seen[2]["mlm"] - history[0]["mlm"]) > 1e-4  # the last step alone is not the mean
    assert summary["final_mlm_loss"] == history[-1]["mlm"] and summary["final_loss"] == history[-1]["loss"]
    assert summary["final_aux_loss"] == history[-1]["aux"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/mlm")] == pytest.approx([h["mlm"] for h in history], rel=1e-6)
    assert "mean over the applied (not skipped) steps" in acc.SummaryMetadata("train/mlm").summary_description
    assert "last step" in acc.SummaryMetadata("train/lr").summary_description


def test_an_in_process_resume_restores_the_schedule_rng_and_data_position(shared_data, cache, tmp_path,
                                                                          monkeypatch):
    """A run resumed from its step-2 checkpoint continues as the uninterrupted run: right after the
    resume the LR schedule stands at step 2 and the RNG is the checkpoint's, and steps 3-4 see the same
    samples (data position), the same LR and, with dropout on (the RNG), the same losses. In this
    process, in seconds (a resume that forgot the scheduler was caught only by a slow 2-rank test)."""
    import shutil

    import torch

    from tcd_ds import train as tr
    from tcd_ds.checkpoint import safe_load
    from tcd_ds.optim import lr_lambda

    from trainer_utils import train_in_process

    def args(run: Path) -> list[str]:
        return _tiny_moe(shared_data, cache, run, 4, "train.save_every=2", "train.keep_checkpoints=3",
                         "model.hidden_dropout=0.1", "train.warmup_steps=3")

    straight = train_in_process(args(tmp_path / "straight"), monkeypatch)
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_00000002",
                    resumed_dir / "checkpoints" / "step_00000002")
    seen, real = {}, tr.resume

    def resume(t):
        real(t)
        seen.update(step=t.step, last_epoch=t.scheduler.last_epoch, lr=t.scheduler.get_last_lr()[0],
                    rng=torch.get_rng_state(), train=t.cfg.train)

    monkeypatch.setattr(tr, "resume", resume)
    resumed = train_in_process(args(resumed_dir), monkeypatch)
    saved = safe_load(resumed_dir / "checkpoints" / "step_00000002" / "rng_rank00000.pt")
    assert seen["step"] == 2 and seen["last_epoch"] == 2
    assert seen["lr"] == pytest.approx(seen["train"].lr * lr_lambda(seen["train"])(2), rel=1e-12)
    assert torch.equal(seen["rng"], saved["torch"])
    a = {h["step"]: h for h in straight["history"]}
    b = {h["step"]: h for h in resumed["history"]}
    assert sorted(b) == [3, 4]  # this process's log lines: the steps after the checkpoint
    for step in (3, 4):
        assert b[step]["samples_rank0"] == a[step]["samples_rank0"], step  # the data position
        assert b[step]["lr"] == a[step]["lr"], step
        for key in ("loss", "mlm", "aux"):
            assert abs(b[step][key] - a[step][key]) <= 1e-6, (step, key, a[step][key], b[step][key])
    assert resumed["tokens"] == straight["tokens"] and resumed["steps"] == 4


def test_an_in_process_run_leaves_no_launcher_variables_behind():
    """What the trainer exports into os.environ during an in-process test is gone after it, so later
    subprocesses of the session do not take a stale MASTER_PORT as a launcher's."""
    import os

    absent = [k for k in ("RANK", "MASTER_PORT") if k not in os.environ]
    with pytest.MonkeyPatch.context() as mp:
        clean_launch_env(mp)
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_PORT="12345")  # as init_distributed does
    assert not [k for k in absent if k in os.environ]


def test_each_save_is_timed_and_a_slow_one_is_named_at_the_next_start(shared_data, cache, tmp_path, monkeypatch,
                                                                     capsys):
    """Issue 27: a save's seconds go into its complete.json, TensorBoard (checkpoint/save_seconds) and
    summary.json; a job that resumes from a checkpoint whose save took longer than its signal lead
    minus the requeue margin says so in one warning line naming --signal and the figure."""
    import json as _json

    from tcd_ds import checkpoint as ck
    from tcd_ds import train as tr

    from trainer_utils import train_in_process

    run = tmp_path / "run"
    summary = train_in_process(_tiny_moe(shared_data, cache, run, 2, "train.save_every=1"), monkeypatch)
    tag_dir = run / "checkpoints" / ck.tag_for(2)
    seconds = ck.save_seconds(tag_dir)
    assert seconds is not None and seconds > 0 and summary["last_save_seconds"] == pytest.approx(seconds)
    assert _json.loads((tag_dir / ck.COMPLETE).read_text())["layout"] == {  # what a resume is checked against
        "world_size": 1, "zero_stage": 0, "backend": "torch", "ep_size": 1}
    assert tr.warn_slow_save(tag_dir, {}) is None  # no lead known: nothing to compare
    assert tr.warn_slow_save(tag_dir, {"TCD_SIGNAL_LEAD_S": str(seconds + 61)}) is None
    done = _json.loads((tag_dir / ck.COMPLETE).read_text())
    (tag_dir / ck.COMPLETE).write_text(_json.dumps({**done, "seconds": 700.0}))
    line = tr.warn_slow_save(tag_dir, {"TCD_SIGNAL_LEAD_S": "600", "TCD_REQUEUE_MARGIN": "60"})
    assert line.startswith("warning: the last checkpoint took 700 s") and "--signal=B:USR1@600" in line
    assert "540 s" in line
    capsys.readouterr()
    monkeypatch.setenv("TCD_SIGNAL_LEAD_S", "600")
    train_in_process(_tiny_moe(shared_data, cache, run, 3, "train.save_every=1"), monkeypatch)  # resumes from step 2
    err = capsys.readouterr().err
    assert err.count("warning: the last checkpoint took 700 s") == 1, err[-2000:]


@pytest.mark.parametrize("mine, other, agreed", [
    ("step_00000020", 20, "step_00000020"), ("step_00000020", 10, "step_00000010"),
    ("step_00000010", 20, "step_00000010"), (None, None, None), ("step_00000020", None, "error"),
    (None, 20, "error")])
def test_the_ranks_agree_on_one_resume_checkpoint(mine, other, agreed, monkeypatch, capsys, tmp_path):
    """Issue 27: each rank chose its resume checkpoint alone, before the process group; a stale
    listing let ranks load different steps. They now agree on the oldest choice (one all-reduce, with
    one line from rank 0 when they differed); a rank that sees none while another resumes is an error."""
    import torch

    from tcd_ds import train as tr
    from tcd_ds.dist import Layout
    from tcd_ds.model.hf import CheckpointError

    theirs = -1.0 if other is None else float(other)

    def all_reduce(t, op=None):  # this rank's (step, -step) against the other rank's
        t.copy_(torch.minimum(t, torch.tensor([theirs, -theirs], dtype=t.dtype)))

    monkeypatch.setattr(tr.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(tr.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(tr.dist, "all_reduce", all_reduce)
    monkeypatch.setattr("tcd_ds.optim.comm_device", lambda: torch.device("cpu"))
    layout = Layout(0, 2, 0, "127.0.0.1", 0, "deepspeed/torchrun")
    if agreed == "error":
        with pytest.raises(CheckpointError, match="some see none, others resume from step 20"):
            tr.agree_on_resume(mine, tmp_path, layout)
        return
    assert tr.agree_on_resume(mine, tmp_path, layout) == agreed
    err = capsys.readouterr().err
    assert ("every rank resumes from" in err) is (mine != agreed or (other is not None and mine != f"step_{other:08d}"))


def test_fp16_loss_scale_overflows_do_not_count_as_non_finite_steps():
    """Issue 27: DeepSpeed's ordinary fp16 overflow skips (the scale still dropping) counted towards
    the 3-in-a-row non-finite stop, so an fp16 run with a too-high initial scale exited 3 in its first
    steps. Only skips the scaler cannot explain count: at its minimum scale, our guard's, or outside fp16."""
    from types import SimpleNamespace

    from tcd_ds import train as tr

    messages = []
    t = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(max_nonfinite_steps=3)),
                        run=SimpleNamespace(ckpt_dir="ckpt"), optimizer=SimpleNamespace(skipped=False),
                        monitor=SimpleNamespace(message=messages.append, scalars=lambda *a: None),
                        loss_scale=2.0 ** 16, skipped_total=0, in_a_row=0)
    for scale in (2.0 ** 15, 2.0 ** 14, 2.0 ** 13, 2.0 ** 12):  # four overflows while the scale drops
        assert tr.account_skip(t, 1, True, [], scale) is True
    assert t.in_a_row == 0 and t.skipped_total == 0 and "loss scale 65536 -> 32768" in messages[0]
    assert tr.account_skip(t, 5, False, [], 2.0 ** 12) is False and t.loss_scale == 2.0 ** 12
    for n in (1, 2):  # at the minimum the scale cannot drop: these count
        assert tr.account_skip(t, 5 + n, True, [], 2.0 ** 12) and t.in_a_row == n
    with pytest.raises(tr.NonFiniteError, match="3 steps in a row"):
        tr.account_skip(t, 8, True, [], 2.0 ** 12)
    t.in_a_row, t.optimizer.skipped = 0, True  # our guard's skip (a non-finite loss) counts whatever the scale
    assert tr.account_skip(t, 9, True, ["MLM"], 2.0 ** 11) and t.in_a_row == 1
    t.in_a_row, t.optimizer.skipped, t.loss_scale = 0, False, None  # bf16 / fp32: no scaler
    assert tr.account_skip(t, 10, True, [], None) and t.in_a_row == 1
    assert tr.fp16_loss_scale(SimpleNamespace(fp16_enabled=lambda: False)) is None
    zero = SimpleNamespace(fp16_enabled=lambda: True, optimizer=SimpleNamespace(loss_scaler=SimpleNamespace(cur_scale=8.0)))
    assert tr.fp16_loss_scale(zero) == 8.0
