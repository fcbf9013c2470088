"""The local Slurm test cluster (tests/slurm_cluster.py) and slurm/launch.sh, with trivial jobs.

Needs root + `bash slurm/setup_ci_slurm.sh`; fails (does not skip) when Slurm is missing, unless
TCD_SKIP_SLURM=1. About 70 s, most of it `test_time_limit_signal_requeue` (Slurm checks time
limits only every ~30 s) and `test_requeue_before_the_time_limit_when_the_save_outlasts_it`.
"""
from __future__ import annotations

import os
import shutil
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
    ranks = sorted(line for line in out.splitlines() if "rank=" in line)
    assert ranks == [f"{r}: rank={r} cpus=2 omp=2 Cpus_allowed_list:0-1 script=tcd_ds/train.py" for r in (0, 1)], out
    assert info["OverSubscribe"] == "NO" and info["MinMemoryNode"] == "0", info  # --exclusive --mem=0


def _iface_holding(addr: str) -> str:
    for line in subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout.splitlines():
        fields = line.split()
        if fields[3].split("/")[0] == addr:
            return fields[1]
    raise AssertionError(f"no interface holds {addr}")


def test_tcd_train_labels_rank_lines_and_exports_network_and_debug_env(slurm_cluster: SlurmCluster, tmp_path: Path):
    """Every line of a rank starts with its rank (`srun --label`); the ranks get NCCL_DEBUG=WARN,
    PYTHONFAULTHANDLER=1 and NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME = the interface that holds
    MASTER_ADDR (this host's real address: the nodes' NodeAddr is loopback), each unless the user set
    it. TCD_PYTHON: a stand-in that reports, not the trainer."""
    c = slurm_cluster
    fake = _script(tmp_path / "python", 'echo "rank=$RANK master=$MASTER_ADDR nccl=${NCCL_SOCKET_IFNAME:-unset} '
                   'gloo=${GLOO_SOCKET_IFNAME:-unset} debug=${NCCL_DEBUG:-unset} '
                   'faulthandler=${PYTHONFAULTHANDLER:-unset}"\n')
    fake.chmod(0o755)
    env = {**JOB_ENV, "TCD_PYTHON": str(fake), "TCD_TEACHER": str(tmp_path), "TCD_RUN_DIR": str(tmp_path / "run"),
           "NCCL_DEBUG": "", "PYTHONFAULTHANDLER": "", "NCCL_SOCKET_IFNAME": "", "GLOO_SOCKET_IFNAME": ""}
    mine = {"NCCL_DEBUG": "INFO", "PYTHONFAULTHANDLER": "0", "NCCL_SOCKET_IFNAME": "=lo", "GLOO_SOCKET_IFNAME": "lo"}
    outs = {}
    for name, extra in (("default", {}), ("mine", mine)):
        jid = c.sbatch(REPO / "slurm" / "tcd_large.sh", "-N", "2", "--ntasks-per-node=1", "--gpus-per-node=0",
                       "--cpus-per-task=2", "--time=30", "-o", str(tmp_path / f"{name}.txt"), cwd=REPO,
                       env={**env, **extra})
        info = c.wait(jid, timeout=60)
        outs[name] = (tmp_path / f"{name}.txt").read_text()
        assert info["JobState"] == "COMPLETED", (info, outs[name])
    lines = sorted(line for line in outs["default"].splitlines() if "rank=" in line)
    master = lines[0].split("master=")[1].split()[0]
    dev = _iface_holding(master)
    assert dev != "lo", (master, dev)
    assert lines == [f"{r}: rank={r} master={master} nccl={dev} gloo={dev} debug=WARN faulthandler=1"
                     for r in (0, 1)], outs["default"]
    lines = sorted(line for line in outs["mine"].splitlines() if "rank=" in line)
    assert lines == [f"{r}: rank={r} master={master} nccl==lo gloo=lo debug=INFO faulthandler=0"
                     for r in (0, 1)], outs["mine"]


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


def test_glue_sweep_is_signalled_before_its_time_limit_and_requeued(slurm_cluster: SlurmCluster, tmp_path: Path):
    """slurm/glue_sweep.sh asks for --signal=B:USR1@300: with --time=5 the signal comes within
    slurmctld's ~30 s check; the sweep (a stand-in that, like tcd_ds.finetune, saves and exits 85 on
    USR1) is requeued and its rerun goes on, instead of the task running into its limit (TIMEOUT)."""
    c = slurm_cluster
    fake = _script(tmp_path / "python", r"""
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
  trap 'echo "sweep: USR1, saved, exit 85"; exit 85' USR1
  echo ready > "$OUTDIR/ready"
  for i in $(seq 900); do sleep 0.1; done
  exit 3
fi
echo "sweep: rerun ${SLURM_RESTART_COUNT} of $3 --task $7"
""")
    fake.chmod(0o755)
    env = {**JOB_ENV, "TCD_PYTHON": str(fake), "TCD_MODEL": str(tmp_path), "TCD_GLUE_DIR": str(tmp_path),
           "TCD_OUT": str(tmp_path / "glue"), "OUTDIR": str(tmp_path)}
    jid = c.sbatch(REPO / "slurm" / "glue_sweep.sh", "--array=2", "--gpus-per-node=0", "--cpus-per-task=1",
                   "--time=5", "-o", str(tmp_path / "out.txt"), cwd=REPO, env=env)
    _wait_files(tmp_path, "ready", 1)
    info = c.wait(jid, states=("PENDING",) + sc.TERMINAL_STATES, timeout=90)
    out = (tmp_path / "out.txt").read_text()
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", (info, out)
    assert "sweep: USR1, saved, exit 85" in out and f"tcd: requeueing job {jid} (restart count now 0; status 85)" in out, out
    c.release_begin_time(jid)
    info = c.wait(jid, timeout=60)
    out = (tmp_path / "out.txt").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, out)
    assert "sweep: rerun 1 of tcd_ds.finetune --task MRPC" in out, out


# Two ranks that have saved one complete checkpoint; on USR1 each starts a save that outlasts the
# job's time limit. The batch shell must requeue before the limit anyway (a job that reaches its
# limit ends TIMEOUT and is never requeued); the rerun resumes from the last complete checkpoint.
SLOW_SAVE_JOB = r"""
source "$TCD_REPO/slurm/launch.sh"
echo "batch restart=${SLURM_RESTART_COUNT:-unset}"
tcd_srun_requeueable --run-dir "$OUTDIR/run" srun bash -c '
  r=$SLURM_PROCID; n=${SLURM_RESTART_COUNT:-0}; ck=$OUTDIR/run/checkpoints
  if [ "$n" = 0 ]; then
    mkdir -p $ck/step_00000001 && touch $ck/step_00000001/complete.json
    trap "mkdir -p $ck/step_00000002; sleep 600; touch $ck/step_00000002/complete.json" USR1
    echo ready > $OUTDIR/ready.$r
    for i in $(seq 1200); do sleep 0.1; done
    exit 3
  fi
  latest=$(cd $ck && ls -d step_* | while read d; do [ -f $d/complete.json ] && echo $d; done | sort | tail -n1)
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
    assert "requeueing in at most" in out and "did not finish saving in time" in out, out
    assert "newest complete checkpoint: step 1)" in out, out  # progress: step 1 is newer than the start
    if info["JobState"] == "PENDING":
        c.release_begin_time(jid)
    info = c.wait(jid, timeout=60)
    out = (tmp_path / "out.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, out)
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "step_00000002").is_dir() and not (ck / "step_00000002" / "complete.json").exists()  # cut off
    assert {(tmp_path / f"done.{r}").read_text() for r in (0, 1)} == \
        {f"rank={r} restart=1 resumes from step_00000001\n" for r in (0, 1)}


# Two ranks: first run waits for USR1, "checkpoints" (marker per rank) and exits 85; the
# requeued run (SLURM_RESTART_COUNT=1) writes done.<rank>. Also `sleep` children of the task
# receive USR1 (Slurm signals every process of the step) -- the rank's trap must be the only
# thing that matters, so the loop below tolerates its children dying.
REQUEUE_JOB = r"""
source "$TCD_REPO/slurm/launch.sh"
echo "batch restart=${SLURM_RESTART_COUNT:-unset}"
tcd_srun_requeueable srun bash -c '
  r=$SLURM_PROCID; n=${SLURM_RESTART_COUNT:-0}
  trap "echo rank=$r restart=$n > $OUTDIR/ckpt.$r.$n; exit 85" USR1 TERM
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
def test_sigterm_to_the_batch_shell_saves_and_requeues(slurm_cluster: SlurmCluster, tmp_path: Path):
    """A SIGTERM to the batch shell (preemption; here `scancel --signal=TERM --batch`): the shell
    traps it like USR1 (forward, wait for the ranks' save, requeue) instead of dying, which ended the
    job with the ranks killed unsaved; the rerun completes."""
    c = slurm_cluster
    jid = c.sbatch(_script(tmp_path / "rq.sh", REQUEUE_JOB), "-N", "2", "--ntasks-per-node=1",
                   "--requeue", "--open-mode=append", "-o", str(tmp_path / "out.log"),
                   cwd=tmp_path, env={**JOB_ENV, "OUTDIR": str(tmp_path)})
    _wait_files(tmp_path, "ready.*", 2)
    c.run(["scancel", "--signal=TERM", "--batch", str(jid)])
    _check_requeued(c, jid, tmp_path)
    assert f"tcd: SIGTERM in batch shell of job {jid}" in (tmp_path / "out.log").read_text()


# One rank per job; on USR1 it exits with $STATUS, or with HANG=1 ignores it (a rank stuck before
# its first step: the signal changes nothing, it never returns)
STATUS_JOB = r"""
source "$TCD_REPO/slurm/launch.sh"
tcd_srun_requeueable --run-dir "$OUTDIR/run.$STATUS" srun bash -c '
  if [ "$HANG" = 1 ]; then trap "" USR1; else trap "exit $STATUS" USR1; fi
  echo ready > $OUTDIR/ready.$STATUS
  for i in $(seq 600); do sleep 0.1; done
  exit 9
'
"""


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.slurm
def test_the_chain_ends_on_any_status_but_a_signal_save(slurm_cluster: SlurmCluster, tmp_path: Path):
    """After USR1, ranks that exit 0 (the signal came during the final save), 2 (a user error) or 3
    (non-finite loss) are not requeued: the job ends with their status and one line naming it. Ranks
    that do not return by the requeue margin (TCD_REQUEUE_MARGIN larger than the time left: at once)
    and saved no newer checkpoint are not requeued either: one `error:` line, status 124."""
    c = slurm_cluster
    jobs = {}
    for status in (0, 2, 3, 124):
        env = {**JOB_ENV, "OUTDIR": str(tmp_path), "STATUS": str(status), "HANG": str(int(status == 124)),
               "TCD_REQUEUE_MARGIN": "100000" if status == 124 else "60"}
        jobs[status] = c.sbatch(_script(tmp_path / "st.sh", STATUS_JOB), "-N", "1", "-n", "1", "--requeue",
                                "--time=5", "-o", str(tmp_path / f"out.{status}"), cwd=tmp_path, env=env)
    _wait_files(tmp_path, "ready.*", 4, timeout=60)
    for jid in jobs.values():
        c.run(["scancel", "--signal=USR1", "--batch", str(jid)])
    for status, jid in jobs.items():
        info = c.wait(jid, states=sc.TERMINAL_STATES + ("PENDING",), timeout=60)
        out = (tmp_path / f"out.{status}").read_text()
        assert info["Restarts"] == "0", (status, info, out)
        assert info["JobState"] == ("COMPLETED" if status == 0 else "FAILED"), (status, info, out)
        assert info["ExitCode"] == f"{status}:0", (status, info, out)
        if status == 124:
            assert f"error: not requeueing job {jid}: its ranks did not return before the requeue margin " \
                   "and saved no checkpoint newer than step 0" in out, out
        else:
            assert f"tcd: not requeueing job {jid}: the ranks exited with status {status} (" in out, out
        assert len([line for line in out.splitlines() if "not requeueing" in line]) == 1, out


# Ranks that exit 85 (a signal save) at once: the first run leaves a new complete checkpoint, the
# later ones none
CHAIN_JOB = r"""
source "$TCD_REPO/slurm/launch.sh"
echo "batch restart=${SLURM_RESTART_COUNT:-0}"
tcd_srun_requeueable --run-dir "$OUTDIR/run" srun bash -c '
  ck=$OUTDIR/run/checkpoints/step_00000005
  [ "${SLURM_RESTART_COUNT:-0}" = 0 ] && mkdir -p $ck && touch $ck/complete.json
  exit 85
'
"""


def _wait_restarts(c: SlurmCluster, jid: int, restarts: int) -> dict[str, str]:
    """The job once its run `restarts` has ended: requeued (PENDING) or finished for good."""
    t_end = time.monotonic() + 60
    while time.monotonic() < t_end:
        info = c.job_state(jid)
        if info.get("Restarts") == str(restarts + 1) and info.get("JobState") == "PENDING":
            return info
        if info.get("Restarts") == str(restarts) and info.get("JobState") in sc.TERMINAL_STATES:
            return info
        time.sleep(0.3)
    raise TimeoutError(f"job {jid}: run {restarts} did not end: {c.job_state(jid)}")


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.slurm
def test_the_chain_stops_after_max_requeues_without_progress(slurm_cluster: SlurmCluster, tmp_path: Path):
    """Status 85 is requeued (with or without a signal to the batch shell); TCD_MAX_REQUEUES=1: the
    first requeue follows a new checkpoint, the second (no new checkpoint) is the one allowed, the
    third would be the second in a row without progress: the job ends FAILED 85 with one line."""
    c = slurm_cluster
    jid = c.sbatch(_script(tmp_path / "chain.sh", CHAIN_JOB), "-N", "1", "-n", "1", "--requeue",
                   "--open-mode=append", "-o", str(tmp_path / "out.log"), cwd=tmp_path,
                   env={**JOB_ENV, "OUTDIR": str(tmp_path), "TCD_MAX_REQUEUES": "1"})
    for run in (0, 1):
        info = _wait_restarts(c, jid, run)
        assert info["JobState"] == "PENDING", (run, info, (tmp_path / "out.log").read_text())
        c.release_begin_time(jid)
    info = _wait_restarts(c, jid, 2)
    out = (tmp_path / "out.log").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "85:0", (info, out)
    assert out.count("tcd: requeueing job") == 2, out
    assert "status 85, newest complete checkpoint: step 5)" in out, out
    assert out.count("not requeueing") == 1, out
    assert f"error: not requeueing job {jid}: 1 requeues in a row without a new complete checkpoint " \
           "(newest: step 5; TCD_MAX_REQUEUES=1)" in out, out
    assert (tmp_path / "run" / ".requeues").read_text() == f"{jid} 1\n"


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.slurm
def test_without_a_run_dir_every_requeue_counts(slurm_cluster: SlurmCluster, tmp_path: Path):
    """No --run-dir (slurm/glue_sweep.sh): no checkpoints to see progress in, so with
    TCD_MAX_REQUEUES=1 a task that exits 85 is requeued once, then the job ends with one line."""
    c = slurm_cluster
    job = _script(tmp_path / "norun.sh", 'source "$TCD_REPO/slurm/launch.sh"\ntcd_srun_requeueable srun bash -c "exit 85"\n')
    jid = c.sbatch(job, "-N", "1", "-n", "1", "--requeue", "--open-mode=append", "-o", str(tmp_path / "out.log"),
                   cwd=tmp_path, env={**JOB_ENV, "TCD_MAX_REQUEUES": "1"})
    assert _wait_restarts(c, jid, 0)["JobState"] == "PENDING"
    c.release_begin_time(jid)
    info = _wait_restarts(c, jid, 1)
    out = (tmp_path / "out.log").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "85:0", (info, out)
    assert f"tcd: requeueing job {jid} (restart count now 0; status 85)\n" in out, out
    assert f"error: not requeueing job {jid}: requeued 1 times already (TCD_MAX_REQUEUES=1)\n" in out, out


# On USR1 the rank notes when it got it; `squeue` (the batch shell's time-left query) is slow
FORWARD_JOB = r"""
source "$TCD_REPO/slurm/launch.sh"
tcd_srun_requeueable srun bash -c '
  trap "date +%s.%N > $OUTDIR/got; exit 0" USR1
  echo ready > $OUTDIR/ready
  for i in $(seq 600); do sleep 0.1; done
'
"""


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.slurm
def test_the_signal_is_forwarded_before_the_time_left_query(slurm_cluster: SlurmCluster, tmp_path: Path):
    """An `squeue` that takes 10 s (a busy slurmctld) must not delay the ranks' save: the batch shell
    forwards USR1 first and asks for the time left after."""
    c = slurm_cluster
    fake = tmp_path / "bin"
    fake.mkdir()
    _script(fake / "squeue", f'sleep 10; exec {shutil.which("squeue")} "$@"\n').chmod(0o755)
    jid = c.sbatch(_script(tmp_path / "fw.sh", FORWARD_JOB), "-N", "1", "-n", "1", "--time=5",
                   "-o", str(tmp_path / "out.log"), cwd=tmp_path,
                   env={**JOB_ENV, "OUTDIR": str(tmp_path), "PATH": f"{fake}:{os.environ['PATH']}"})
    _wait_files(tmp_path, "ready", 1)
    sent = time.time()
    c.run(["scancel", "--signal=USR1", "--batch", str(jid)])
    got = float(_wait_files(tmp_path, "got", 1, timeout=30)[0].read_text())
    assert got - sent < 5, (got - sent, (tmp_path / "out.log").read_text())
    info = c.wait(jid, timeout=60)
    assert info["JobState"] == "COMPLETED", (info, (tmp_path / "out.log").read_text())


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
