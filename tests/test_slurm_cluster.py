"""The local Slurm test cluster (tests/slurm_cluster.py) and slurm/launch.sh, with trivial jobs.

Needs root + `bash slurm/setup_ci_slurm.sh`; fails (does not skip) when Slurm is missing, unless
TCD_SKIP_SLURM=1. About 70 s, most of it `test_time_limit_signal_requeue` (Slurm checks time
limits only every ~30 s) and `test_requeue_before_the_time_limit_when_the_save_outlasts_it`.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

import slurm_cluster as sc
from slurm_cluster import SlurmCluster

REPO = Path(__file__).resolve().parents[1]
JOB_ENV = {"TCD_REPO": str(REPO)}


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    return path


def _wait_files(pattern_dir: Path, glob: str, n: int, timeout: float = 30) -> list[Path]:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        found = sorted(pattern_dir.glob(glob))
        if len(found) >= n:
            return found
        time.sleep(0.2)
    raise TimeoutError(f"{n} files {glob} in {pattern_dir}: {list(pattern_dir.iterdir())}")


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.slurm
def test_two_node_job_ranks(slurm_cluster: SlurmCluster, tmp_path: Path):
    c = slurm_cluster
    assert c.node_states() == {"n1": "idle", "n2": "idle"}
    job = _script(tmp_path / "ranks.sh", "srun bash -c 'echo rank=$SLURM_PROCID "
                  "node=$SLURMD_NODENAME local=$SLURM_LOCALID ntasks=$SLURM_NTASKS'\n")
    jid = c.sbatch(job, "-N", "2", "--ntasks-per-node=1", "-o", str(tmp_path / "out.txt"),
                   cwd=tmp_path)
    info = c.wait(jid, timeout=60)
    out = (tmp_path / "out.txt").read_text()
    assert info["JobState"] == "COMPLETED", (info, out, c.logs())
    assert info["ExitCode"] == "0:0" and info["NodeList"] == "n[1-2]"
    lines = sorted(out.split())
    rows = [dict(kv.split("=") for kv in line.split()) for line in out.strip().splitlines()]
    assert len(rows) == 2, out
    assert {r["rank"] for r in rows} == {"0", "1"}
    assert {r["node"] for r in rows} == {"n1", "n2"}
    assert all(r["local"] == "0" and r["ntasks"] == "2" for r in rows), lines


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.slurm
def test_failed_job_and_unknown_job(slurm_cluster: SlurmCluster, tmp_path: Path):
    c = slurm_cluster
    jid = c.sbatch(_script(tmp_path / "fail.sh", "exit 3\n"), "-N", "1",
                   "-o", str(tmp_path / "o"), cwd=tmp_path)
    info = c.wait(jid, timeout=60)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", info
    assert c.job_state(jid)["JobState"] == "FAILED"          # still visible (MinJobAge=300)
    assert c.job_state(987654) == {}
    line = "JobId=7 JobName=a b JobState=RUNNING Reason=None TRES=cpu=2,node=2 Command=/x y"
    assert sc.parse_scontrol_oneliner(line) == {
        "JobId": "7", "JobName": "a b", "JobState": "RUNNING", "Reason": "None",
        "TRES": "cpu=2,node=2", "Command": "/x y"}


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.slurm
def test_launch_helpers_master_addr_port_hostfile(slurm_cluster: SlurmCluster, tmp_path: Path):
    """The nodes' NodeAddr is loopback (127.0.0.1): a 2-node job's MASTER_ADDR is the first node's
    real address instead, from the batch shell on that node and from anywhere else (via srun)."""
    c = slurm_cluster
    job = _script(tmp_path / "launch.sh", f"""
source "$TCD_REPO/slurm/launch.sh"
set -e
echo "first=$(tcd_hosts | head -n1)"
echo "nodeaddr=$(tcd_node_addr n1)"
echo "addr=$(tcd_master_addr)"
echo "elsewhere=$(SLURMD_NODENAME=n2 tcd_master_addr)"
echo "port=$(tcd_master_port)"
tcd_write_hostfile {tmp_path}/hostfile
tcd_export_dist_env
srun bash -c 'source "$TCD_REPO/slurm/launch.sh"; tcd_rank_env; \
  echo "task RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE NODE_RANK=$NODE_RANK \
MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"' | sort
""")
    jid = c.sbatch(job, "-N", "2", "--ntasks-per-node=1", "-o", str(tmp_path / "out.txt"),
                   cwd=tmp_path, env=JOB_ENV)
    info = c.wait(jid, timeout=60)
    out = (tmp_path / "out.txt").read_text()
    assert info["JobState"] == "COMPLETED", (info, out)
    port = 10000 + jid % 20000
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line and not line.startswith("task "))
    addr = fields.get("addr", "")
    own = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    assert addr in own and not addr.startswith("127."), (addr, own, out)  # this host's real address
    assert f"first=n1\nnodeaddr=127.0.0.1\naddr={addr}\nelsewhere={addr}\nport={port}\n" in out, out
    assert (tmp_path / "hostfile").read_text() == "n1 slots=1\nn2 slots=1\n"
    tasks = [line for line in out.splitlines() if line.startswith("task ")]
    assert tasks == [f"task RANK={r} LOCAL_RANK=0 WORLD_SIZE=2 NODE_RANK={r} "
                     f"MASTER_ADDR={addr} MASTER_PORT={port}" for r in (0, 1)], out


def test_tcd_train_gives_every_rank_its_cpus(slurm_cluster: SlurmCluster, tmp_path: Path):
    """`sbatch --cpus-per-task=2 slurm/tcd_large.sh`: each rank is bound to 2 CPUs and runs 2 OpenMP
    threads. The cluster binds a task to the CPUs its step asked for (task/affinity, autobind=cores):
    an srun that does not pass --cpus-per-task on gets one CPU per rank (Slurm 22.05-23.02). The
    header's --exclusive --mem=0 reach the job. TCD_PYTHON: a stand-in that reports, not the trainer."""
    c = slurm_cluster
    fake = _script(tmp_path / "python", 'echo "rank=$RANK cpus=$(nproc) omp=${OMP_NUM_THREADS:-unset} '
                   '$(grep Cpus_allowed_list /proc/self/status | tr -d "\t ") script=$2"\n')
    fake.chmod(0o755)
    env = {**JOB_ENV, "TCD_PYTHON": str(fake), "TCD_TEACHER": str(tmp_path), "TCD_RUN_DIR": str(tmp_path / "run")}
    jid = c.sbatch(REPO / "slurm" / "tcd_large.sh", "-N", "2", "--ntasks-per-node=1", "--gpus-per-node=0",
                   "--cpus-per-task=2", "--time=30", "-o", str(tmp_path / "out.txt"), cwd=REPO,
                   env={**env, "OMP_NUM_THREADS": ""})  # unset: tcd_train sets it
    info = c.wait(jid, timeout=60)
    out = (tmp_path / "out.txt").read_text()
    assert info["JobState"] == "COMPLETED", (info, out)
    ranks = sorted(line for line in out.splitlines() if line.startswith("rank="))
    assert ranks == [f"rank={r} cpus=2 omp=2 Cpus_allowed_list:0-1 script=tcd_ds/train.py" for r in (0, 1)], out
    assert info["OverSubscribe"] == "NO" and info["MinMemoryNode"] == "0", info  # --exclusive --mem=0


def test_glue_sweep_gives_its_task_its_cpus(slurm_cluster: SlurmCluster, tmp_path: Path):
    """slurm/glue_sweep.sh's srun passes --cpus-per-task on too (TCD_PYTHON: a stand-in again)."""
    c = slurm_cluster
    fake = _script(tmp_path / "python", 'echo "cpus=$(nproc) omp=${OMP_NUM_THREADS:-unset} $2 $3"\n')
    fake.chmod(0o755)
    env = {**JOB_ENV, "TCD_PYTHON": str(fake), "TCD_MODEL": str(tmp_path), "TCD_GLUE_DIR": str(tmp_path),
           "TCD_OUT": str(tmp_path / "glue"), "OMP_NUM_THREADS": ""}
    jid = c.sbatch(REPO / "slurm" / "glue_sweep.sh", "--array=1", "--gpus-per-node=0", "--cpus-per-task=2",
                   "--time=5", "-o", str(tmp_path / "out.txt"), cwd=REPO, env=env)
    info = c.wait(jid, timeout=60)
    out = (tmp_path / "out.txt").read_text()
    assert info["JobState"] == "COMPLETED", (info, out)
    assert "cpus=2 omp=2 -m tcd_ds.finetune" in out, out


# Two ranks that have saved one complete checkpoint; on USR1 each starts a save that outlasts the
# job's time limit. The batch shell must requeue before the limit anyway (a job that reaches its
# limit ends TIMEOUT and is never requeued); the rerun resumes from the last complete checkpoint.
SLOW_SAVE_JOB = r"""
source "$TCD_REPO/slurm/launch.sh"
echo "batch restart=${SLURM_RESTART_COUNT:-unset}"
tcd_srun_requeueable srun bash -c '
  r=$SLURM_PROCID; n=${SLURM_RESTART_COUNT:-0}
  if [ "$n" = 0 ]; then
    mkdir -p $OUTDIR/step_1.$r && touch $OUTDIR/step_1.$r/complete
    trap "mkdir -p $OUTDIR/step_2.$r; sleep 600; touch $OUTDIR/step_2.$r/complete" USR1
    echo ready > $OUTDIR/ready.$r
    for i in $(seq 1200); do sleep 0.1; done
    exit 3
  fi
  latest=$(cd $OUTDIR && ls -d step_*.$r | while read d; do [ -f $d/complete ] && echo $d; done | sort | tail -n1)
  echo "rank=$r restart=$n resumes from $latest" > $OUTDIR/done.$r
'
echo "batch end rc=$?"
"""


def test_requeue_before_the_time_limit_when_the_save_outlasts_it(slurm_cluster: SlurmCluster, tmp_path: Path):
    """USR1 with ~55 s left (--time=1) and TCD_REQUEUE_MARGIN=45: the ranks are still saving 10 s later,
    and the job is requeued then, well before its limit, not left to end TIMEOUT."""
    c = slurm_cluster
    jid = c.sbatch(_script(tmp_path / "slow.sh", SLOW_SAVE_JOB), "-N", "2", "--ntasks-per-node=1", "--requeue",
                   "--time=1", "--open-mode=append", "-o", str(tmp_path / "out.log"), cwd=tmp_path,
                   env={**JOB_ENV, "OUTDIR": str(tmp_path), "TCD_REQUEUE_MARGIN": "45"})
    _wait_files(tmp_path, "ready.*", 2)
    signalled = time.monotonic()
    c.run(["scancel", "--signal=USR1", "--batch", str(jid)])
    info = c.wait(jid, states=("PENDING", "COMPLETED", "TIMEOUT", "FAILED", "CANCELLED"), timeout=120)
    took = time.monotonic() - signalled
    out = (tmp_path / "out.log").read_text()
    assert info["Restarts"] == "1" and info["JobState"] in ("PENDING", "COMPLETED"), (info, out)
    assert took < 40 and "DUE TO TIME LIMIT" not in out, (took, out)
    assert "requeueing in at most" in out and "did not finish saving in time: requeueing now" in out, out
    if info["JobState"] == "PENDING":
        c.release_begin_time(jid)
    info = c.wait(jid, timeout=60)
    out = (tmp_path / "out.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, out)
    assert sorted(p.name for p in tmp_path.glob("step_2.*")) == ["step_2.0", "step_2.1"]  # cut off
    assert not list(tmp_path.glob("step_2.*/complete"))
    assert {(tmp_path / f"done.{r}").read_text() for r in (0, 1)} == \
        {f"rank={r} restart=1 resumes from step_1.{r}\n" for r in (0, 1)}


# Two ranks: first run waits for USR1, "checkpoints" (marker per rank) and exits 0; the
# requeued run (SLURM_RESTART_COUNT=1) writes done.<rank>. Also `sleep` children of the task
# receive USR1 (Slurm signals every process of the step) -- the rank's trap must be the only
# thing that matters, so the loop below tolerates its children dying.
REQUEUE_JOB = r"""
source "$TCD_REPO/slurm/launch.sh"
echo "batch restart=${SLURM_RESTART_COUNT:-unset}"
tcd_srun_requeueable srun bash -c '
  r=$SLURM_PROCID; n=${SLURM_RESTART_COUNT:-0}
  trap "echo rank=$r restart=$n > $OUTDIR/ckpt.$r.$n; exit 0" USR1
  if [ "$n" = 0 ]; then
    echo ready > $OUTDIR/ready.$r
    for i in $(seq 900); do sleep 0.1; done
    echo timeout > $OUTDIR/bad.$r; exit 3
  fi
  echo "rank=$r restart=$n" > $OUTDIR/done.$r
'
echo "batch end rc=$?"
"""


def _check_requeued(c: SlurmCluster, jid: int, d: Path) -> None:
    # requeue -> PENDING (Reason=BeginTime: Slurm holds requeued jobs ~120 s), Restarts=1
    info = c.wait(jid, states=("PENDING", "COMPLETED"), timeout=60)
    assert info["Restarts"] == "1", info
    if info["JobState"] == "PENDING":
        c.release_begin_time(jid)
    info = c.wait(jid, timeout=60)
    out = (d / "out.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, out, c.logs(80))
    assert sorted(p.name for p in d.glob("ckpt.*")) == ["ckpt.0.0", "ckpt.1.0"], out
    assert (d / "ckpt.1.0").read_text() == "rank=1 restart=0\n"
    assert {(d / f"done.{r}").read_text() for r in (0, 1)} == \
        {"rank=0 restart=1\n", "rank=1 restart=1\n"}
    assert not list(d.glob("bad.*")), out
    # --open-mode=append keeps both runs' output
    assert "batch restart=unset" in out and "batch restart=1" in out, out
    assert "requeueing job" in out and "batch end rc=0" in out, out


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.slurm
def test_usr1_checkpoint_and_requeue(slurm_cluster: SlurmCluster, tmp_path: Path):
    """scancel --signal=USR1 --batch -> ranks checkpoint -> scontrol requeue -> rerun completes."""
    c = slurm_cluster
    jid = c.sbatch(_script(tmp_path / "rq.sh", REQUEUE_JOB), "-N", "2", "--ntasks-per-node=1",
                   "--requeue", "--open-mode=append", "-o", str(tmp_path / "out.log"),
                   cwd=tmp_path, env={**JOB_ENV, "OUTDIR": str(tmp_path)})
    _wait_files(tmp_path, "ready.*", 2)
    c.run(["scancel", "--signal=USR1", "--batch", str(jid)])
    _check_requeued(c, jid, tmp_path)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.slurm
def test_time_limit_signal_requeue(slurm_cluster: SlurmCluster, tmp_path: Path):
    """The production path: sbatch --signal=B:USR1@T fires before the time limit (28-58 s before it
    here: slurmctld checks limits every ~30 s), same requeue chain. TCD_REQUEUE_MARGIN=10 leaves the
    ranks time to save: with the default 60 (more than the time left) the job was requeued at once,
    and whether the ranks had saved first was a race (lost once in CI: no ckpt.1.0)."""
    c = slurm_cluster
    jid = c.sbatch(_script(tmp_path / "rq.sh", REQUEUE_JOB), "-N", "2", "--ntasks-per-node=1",
                   "--requeue", "--time=1", "--signal=B:USR1@58", "--open-mode=append",
                   "-o", str(tmp_path / "out.log"), cwd=tmp_path,
                   env={**JOB_ENV, "OUTDIR": str(tmp_path), "TCD_REQUEUE_MARGIN": "10"})
    _wait_files(tmp_path, "ready.*", 2)
    _check_requeued(c, jid, tmp_path)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.slurm
def test_two_cpus_per_node_second_cluster(slurm_cluster: SlurmCluster, tmp_path: Path):
    """A second cluster beside the fixture's (own ports/socket/dir) with CPUs=2 per node."""
    with SlurmCluster(cpus_per_node=2) as c2:
        assert c2.ctld_port != slurm_cluster.ctld_port and c2.root != slurm_cluster.root
        jid = c2.sbatch(_script(tmp_path / "j.sh", "srun bash -c 'echo $SLURM_PROCID@$SLURMD_NODENAME'\n"),
                        "-N", "2", "--ntasks-per-node=2", "-o", str(tmp_path / "o"), cwd=tmp_path)
        info = c2.wait(jid, timeout=60)
        out = (tmp_path / "o").read_text()
        assert info["JobState"] == "COMPLETED", (info, out)
        assert sorted(out.split()) == ["0@n1", "1@n1", "2@n2", "3@n2"]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.slurm
def test_teardown_kills_daemons_and_jobs(tmp_path: Path):
    if os.environ.get("TCD_SKIP_SLURM") == "1":
        pytest.skip("TCD_SKIP_SLURM=1: Slurm cluster tests skipped on request")
    with pytest.raises(RuntimeError, match="boom"):
        with SlurmCluster() as c:
            pids = dict(c.pids)
            root = c.root
            jid = c.sbatch(_script(tmp_path / "long.sh", "touch started; srun sleep 300\n"),
                           "-N", "2", "-o", str(tmp_path / "o"), cwd=tmp_path)
            c.wait(jid, states=("RUNNING",), timeout=30)
            _wait_files(tmp_path, "started", 1)
            deadline = time.monotonic() + 10
            while len(c._job_pids()) < 4 and time.monotonic() < deadline:  # stepds + sleeps
                time.sleep(0.2)
            job_pids = c._job_pids()
            assert len(job_pids) >= 4, job_pids
            raise RuntimeError("boom")  # a failing test body must still tear everything down
    assert set(pids) == {"munged", "slurmctld", "slurmd-n1", "slurmd-n2"}
    alive = [p for p in [*pids.values(), *job_pids] if sc._pid_alive(p)]
    assert alive == [], alive
    assert c._job_pids() == []
    assert not root.exists()
    c.stop()  # idempotent


def test_missing_binaries_fail_with_hint(monkeypatch):
    monkeypatch.setattr(sc, "REQUIRED_BINARIES", sc.REQUIRED_BINARIES + ("slurmd-does-not-exist",))
    monkeypatch.delenv("TCD_SKIP_SLURM", raising=False)
    with pytest.raises(sc.SlurmUnavailable, match="setup_ci_slurm.sh"):
        sc.check_available()
    with pytest.raises(pytest.fail.Exception, match="slurm/setup_ci_slurm.sh"):
        sc.start_cluster_or_skip()
    monkeypatch.setenv("TCD_SKIP_SLURM", "1")
    with pytest.raises(pytest.skip.Exception, match="TCD_SKIP_SLURM=1"):
        sc.start_cluster_or_skip()
