"""The local Slurm test cluster (tests/slurm_cluster.py) and slurm/launch.sh, with trivial jobs.

Needs root + `bash slurm/setup_ci_slurm.sh`; fails (does not skip) when Slurm is missing, unless
TCD_SKIP_SLURM=1. About 45 s, most of it `test_time_limit_signal_requeue` (Slurm checks time
limits only every ~30 s).
"""
from __future__ import annotations

import os
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


def test_launch_helpers_master_addr_port_hostfile(slurm_cluster: SlurmCluster, tmp_path: Path):
    c = slurm_cluster
    job = _script(tmp_path / "launch.sh", f"""
source "$TCD_REPO/slurm/launch.sh"
set -e
echo "first=$(tcd_hosts | head -n1)"
echo "addr=$(tcd_master_addr)"
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
    assert f"first=n1\naddr=127.0.0.1\nport={port}\n" in out, out
    assert (tmp_path / "hostfile").read_text() == "n1 slots=1\nn2 slots=1\n"
    tasks = [line for line in out.splitlines() if line.startswith("task ")]
    assert tasks == [f"task RANK={r} LOCAL_RANK=0 WORLD_SIZE=2 NODE_RANK={r} "
                     f"MASTER_ADDR=127.0.0.1 MASTER_PORT={port}" for r in (0, 1)], out


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


def test_usr1_checkpoint_and_requeue(slurm_cluster: SlurmCluster, tmp_path: Path):
    """scancel --signal=USR1 --batch -> ranks checkpoint -> scontrol requeue -> rerun completes."""
    c = slurm_cluster
    jid = c.sbatch(_script(tmp_path / "rq.sh", REQUEUE_JOB), "-N", "2", "--ntasks-per-node=1",
                   "--requeue", "--open-mode=append", "-o", str(tmp_path / "out.log"),
                   cwd=tmp_path, env={**JOB_ENV, "OUTDIR": str(tmp_path)})
    _wait_files(tmp_path, "ready.*", 2)
    c.run(["scancel", "--signal=USR1", "--batch", str(jid)])
    _check_requeued(c, jid, tmp_path)


def test_time_limit_signal_requeue(slurm_cluster: SlurmCluster, tmp_path: Path):
    """The production path: sbatch --signal=B:USR1@T fires before the time limit (~30 s here:
    slurmctld checks limits every ~30 s), same requeue chain."""
    c = slurm_cluster
    jid = c.sbatch(_script(tmp_path / "rq.sh", REQUEUE_JOB), "-N", "2", "--ntasks-per-node=1",
                   "--requeue", "--time=1", "--signal=B:USR1@58", "--open-mode=append",
                   "-o", str(tmp_path / "out.log"), cwd=tmp_path,
                   env={**JOB_ENV, "OUTDIR": str(tmp_path)})
    _wait_files(tmp_path, "ready.*", 2)
    _check_requeued(c, jid, tmp_path)


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
