"""`sbatch slurm/tcd_large.sh` on a real 2-node Slurm cluster (one host, CPU mode, tiny model):
the job trains on two ranks on two nodes; USR1 makes every rank save, the job is requeued and the
rerun resumes from the saved step."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster
from trainer_utils import REPO, quick

# the large recipe's script with a tiny model: 2 ranks, expert parallelism over both nodes
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=256",
        "model.max_position=128", "model.moe.num_experts=4", "model.moe.ep_size=2", "data.max_seq_len=64",
        "train.lr=3e-3"]

pytestmark = [pytest.mark.slow, pytest.mark.multiproc, pytest.mark.slurm]




def submit(c: SlurmCluster, shared: Path, tmp: Path, tiny_teacher: Path, steps: int, *extra: str) -> tuple[int, Path]:
    run = tmp / "run"
    overrides = [o for o in quick(shared, tmp / "cache", run, steps) if not o.startswith("run_dir=")] + TINY
    env = {"TCD_CPU": "1", "TCD_TEACHER": str(tiny_teacher), "TCD_RUN_DIR": str(run),
           "TCD_OVERRIDES": " ".join(overrides + list(extra))}
    jid = c.sbatch(REPO / "slurm" / "tcd_large.sh", "-N", "2", "--ntasks-per-node=1", "--gpus-per-node=0",
                   "--cpus-per-task=2", "--time=30", "-o", str(tmp / "out.log"), cwd=REPO, env=env)
    return jid, run


def test_sbatch_tcd_large_trains_on_two_nodes(slurm_cluster, shared_data, tiny_teacher, tmp_path):
    c = slurm_cluster
    start = time.time()
    jid, run = submit(c, shared_data, tmp_path, tiny_teacher, 12)
    info = c.wait(jid, timeout=300)
    out = (tmp_path / "out.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (info, out[-4000:], c.logs())
    print(f"job {jid}: 2-node run took {time.time() - start:.1f} s")
    assert "0: rank 0/2" in out and "1: rank 1/2" in out  # srun --label: each rank's lines carry its rank
    assert {line.split(" on ")[1].split(",")[0] for line in out.splitlines()
            if line.startswith(("0: rank ", "1: rank "))} == {"n1", "n2"}
    assert "launcher deepspeed/torchrun" in out or "launcher slurm" in out
    assert "memory plan per rank (GiB):" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12 and summary["mode"] == "tcd"
    losses = [h["mlm"] for h in summary["history"]]
    assert all(x == x and abs(x) < 1e6 for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert (run / "checkpoints" / "step_00000012" / "complete.json").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "export" / "model.safetensors").is_file()


def test_usr1_saves_requeues_and_resumes(slurm_cluster, shared_data, tiny_teacher, tmp_path):
    c = slurm_cluster
    jid, run = submit(c, shared_data, tmp_path, tiny_teacher, 40)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count('"kind": "train"') >= 3):
        assert c.job_state(jid).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
            (c.job_state(jid), (tmp_path / "out.log").read_text()[-3000:] if (tmp_path / "out.log").exists() else "")
        assert time.time() < deadline, "the job did not reach step 3"
        time.sleep(0.2)
    c.run(["scancel", "--signal=USR1", "--batch", str(jid)])
    info = c.wait(jid, states=("PENDING", "COMPLETED", "FAILED"), timeout=120)
    assert info["Restarts"] == "1", (info, (tmp_path / "out.log").read_text()[-4000:])
    if info["JobState"] == "PENDING":
        c.release_begin_time(jid)  # skip Slurm's ~120 s hold on requeued jobs
    info = c.wait(jid, timeout=300)
    out = (tmp_path / "out.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, out[-4000:])
    saved = int(out.split("signal 10: saved step ")[1].split(";")[0])
    assert 3 <= saved < 40
    assert f"resume: from {run / 'checkpoints' / f'step_{saved:08d}'} (step {saved})" in out
    assert "requeueing job" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40 and sorted(h["step"] for h in summary["history"]) == list(range(1, 41))


def test_deepspeed_hostfile_launcher_path(slurm_cluster, shared_data, tmp_path):
    """TCD_LAUNCHER=deepspeed: a hostfile from the allocation and `deepspeed --launcher slurm` (no ssh)."""
    c = slurm_cluster
    run = tmp_path / "run"
    overrides = [o for o in quick(shared_data, tmp_path / "cache", run, 4) if not o.startswith("run_dir=")] + TINY
    env = {"TCD_CPU": "1", "TCD_MODE": "moe", "TCD_LAUNCHER": "deepspeed", "TCD_RUN_DIR": str(run),
           "TCD_OVERRIDES": " ".join(overrides)}
    jid = c.sbatch(REPO / "slurm" / "teacher_large.sh", "-N", "2", "--ntasks-per-node=1", "--gpus-per-node=0",
                   "--cpus-per-task=2", "--time=30", "-o", str(tmp_path / "out.log"), cwd=REPO, env=env)
    info = c.wait(jid, timeout=300)
    out = (tmp_path / "out.log").read_text()
    assert info["JobState"] == "COMPLETED", (info, out[-4000:])
    assert (run / "hostfile").read_text() == "n1 slots=1\nn2 slots=1\n"
    assert "rank 1/2 (local 0) on n2, device cpu, launcher slurm" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["mode"] == "moe" and summary["steps"] == 4


def trainer_ranks(c: SlurmCluster) -> dict[int, tuple[int, str, str]]:
    """{SLURM_PROCID: (pid, Cpus_allowed_list, OMP_NUM_THREADS)} of the trainer processes of this
    cluster's jobs (`python -u tcd_ds/train.py ...`, as DeepSpeed's srun line starts them)."""
    conf = str(c.conf).encode()
    found = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            if argv[1:3] != [b"-u", b"tcd_ds/train.py"]:
                continue
            env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
                       if b"=" in kv)
            status = Path(f"/proc/{d}/status").read_text()
        except (OSError, IndexError):
            continue
        if env.get(b"SLURM_CONF") == conf and b"SLURM_PROCID" in env:
            cpus = next(line.split(":", 1)[1].strip() for line in status.splitlines()
                        if line.startswith("Cpus_allowed_list"))
            found[int(env[b"SLURM_PROCID"])] = (int(d), cpus, env.get(b"OMP_NUM_THREADS", b"unset").decode())
    return found


def test_deepspeed_launcher_path_cpus_per_rank_and_a_dead_rank_ends_the_job(slurm_cluster, shared_data, tmp_path):
    """TCD_LAUNCHER=deepspeed: DeepSpeed's own srun line gives every rank --cpus-per-task CPUs (2, with
    2 OpenMP threads), and when one rank dies at start-up the job ends at once instead of the other
    rank waiting for it at the rendezvous until the collective timeout (600 s): --kill-on-bad-exit."""
    c = slurm_cluster
    run = tmp_path / "run"
    overrides = [o for o in quick(shared_data, tmp_path / "cache", run, 4) if not o.startswith("run_dir=")] + TINY
    env = {"TCD_CPU": "1", "TCD_MODE": "moe", "TCD_LAUNCHER": "deepspeed", "TCD_RUN_DIR": str(run),
           "TCD_OVERRIDES": " ".join(overrides), "OMP_NUM_THREADS": ""}
    jid = c.sbatch(REPO / "slurm" / "teacher_large.sh", "-N", "2", "--ntasks-per-node=1", "--gpus-per-node=0",
                   "--cpus-per-task=2", "--time=30", "-o", str(tmp_path / "out.log"), cwd=REPO, env=env)
    deadline = time.time() + 120
    while len(ranks := trainer_ranks(c)) < 2:
        assert c.job_state(jid).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), c.job_state(jid)
        assert time.time() < deadline, "the two ranks did not start"
        time.sleep(0.05)
    os.kill(ranks[1][0], signal.SIGKILL)  # rank 1 dies while starting up (before the rendezvous)
    killed = time.time()
    info = c.wait(jid, timeout=60)
    took = time.time() - killed
    out = (tmp_path / "out.log").read_text()
    assert info["JobState"] == "FAILED" and took < 30, (took, info, out[-3000:])
    assert not (run / "summary.json").exists()
    assert {r: (cpus, omp) for r, (_, cpus, omp) in ranks.items()} == {0: ("0-1", "2"), 1: ("0-1", "2")}, out[-3000:]
