"""Slurm at production scale (issue 15), the parts a unit test shows without a cluster: one port
formula for slurm/launch.sh and tcd_ds/dist.py, a master address that is never loopback when the job
spans nodes, the time left before the limit, the sbatch headers, the token cache on a file system
without locks, and work done once by one rank while the others wait at a barrier. The Slurm test
cluster covers the rest (tests/test_slurm_cluster.py, tests/test_slurm_train.py)."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tcd_ds import dist, locks
from tcd_ds.data.shards import build_token_cache, read_index
from tcd_ds.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_SCRIPTS = ["tcd_base", "teacher_base", "tcd_large", "teacher_large", "tcd_xl", "teacher_xl"]


def bash(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"source slurm/launch.sh\n{script}"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


# --- the port ---------------------------------------------------------------------------------------

def test_one_port_formula_for_launch_sh_and_dist_py_below_the_ephemeral_range():
    ids = [0, 1, 9999, 10000, 15000, 19999, 20000, 22768, 39999, 123456789]
    out = bash('for id in ' + " ".join(map(str, ids)) + '; do SLURM_JOB_ID=$id tcd_master_port; done')
    assert out.returncode == 0, out.stderr
    shell = [int(p) for p in out.stdout.split()]
    python = [dist.detect_layout({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": str(i),
                                  "MASTER_ADDR": "10.0.0.1"}).master_port for i in ids]
    assert python == shell
    assert all(10000 <= p < 32768 for p in shell), shell  # Linux's ephemeral range starts at 32768
    assert len(set(shell[:6])) == 6  # concurrent jobs (nearby ids) get distinct ports


# --- the master address -----------------------------------------------------------------------------

def fake_slurm(monkeypatch, hosts: list[str], resolved: dict[str, list[str]]) -> None:
    """`scontrol show hostnames` lists `hosts`; a host name resolves to `resolved[name]`."""
    def run(argv, *args, **kwargs):
        if list(argv[:3]) == ["scontrol", "show", "hostnames"]:
            return subprocess.CompletedProcess(argv, 0, "\n".join(hosts) + "\n", "")
        if list(argv[:3]) == ["scontrol", "show", "node"]:
            return subprocess.CompletedProcess(argv, 0, f"NodeName={argv[3]} NodeAddr={argv[3]}\n", "")
        raise AssertionError(f"unexpected command {argv}")

    def getaddrinfo(host, *args, **kwargs):
        if host not in resolved:
            raise OSError(f"unknown host {host}")
        return [(2, 1, 6, "", (a, 0)) for a in resolved[host]]

    monkeypatch.setattr(dist.subprocess, "run", run)
    monkeypatch.setattr(dist.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(dist.socket, "gethostbyname", lambda host: getaddrinfo(host)[0][4][0])
    # this host's own non-loopback address (the real one reads routes and `hostname -I`)
    monkeypatch.setattr(dist, "local_address", lambda: "10.9.8.7", raising=False)


def test_master_addr_is_never_loopback_when_the_job_spans_nodes(monkeypatch):
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURMD_NODENAME": "n1"}
    # the first node's own name maps to 127.0.1.1 (Debian/Ubuntu images): on that node, its real address
    fake_slurm(monkeypatch, ["n1", "n2"], {"n1": ["127.0.1.1"], "n2": ["127.0.1.1"]})
    assert dist.slurm_master_addr(env) == "10.9.8.7"
    # on another node the first node's address cannot be learnt: one clear error, not a loopback address
    with pytest.raises(RuntimeError, match="export MASTER_ADDR"):
        dist.slurm_master_addr({**env, "SLURMD_NODENAME": "n2"})
    # a name with a loopback and a routable address: the routable one
    fake_slurm(monkeypatch, ["n1", "n2"], {"n1": ["127.0.1.1", "10.1.1.1"]})
    assert dist.slurm_master_addr({**env, "SLURMD_NODENAME": "n2"}) == "10.1.1.1"
    # one node: loopback is right
    fake_slurm(monkeypatch, ["n1"], {"n1": ["127.0.1.1"]})
    assert dist.slurm_master_addr({"SLURM_JOB_NODELIST": "n1", "SLURMD_NODENAME": "n1"}) == "127.0.1.1"
    # names that do not resolve: NodeAddr from `scontrol show node`
    fake_slurm(monkeypatch, ["n1", "n2"], {"10.2.2.2": ["10.2.2.2"]})
    monkeypatch.setattr(dist.subprocess, "run", lambda argv, *a, **k: subprocess.CompletedProcess(
        argv, 0, "n1\nn2\n" if argv[2] == "hostnames" else "NodeName=n1 NodeAddr=10.2.2.2\n", ""))
    assert dist.slurm_master_addr(env) == "10.2.2.2"


# --- the time left ----------------------------------------------------------------------------------

@pytest.mark.parametrize("left, seconds", [
    ("0:52", "52"), ("08:09", "489"), ("2:03:04", "7384"), ("1-02:03:04", "93784"), ("45", "45"),
    ("UNLIMITED", ""), ("NOT_SET", ""), ("INVALID", ""), ("", "")])
def test_time_left_from_squeue(tmp_path, left, seconds):
    squeue = tmp_path / "squeue"
    squeue.write_text('#!/bin/bash\n[ "$*" = "-h -j 77 -o %L" ] || exit 9\nprintf "%s\\n" "$FAKE_LEFT"\n')
    squeue.chmod(0o755)
    out = bash("tcd_time_left", {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "77",
                                 "FAKE_LEFT": left})
    assert (out.returncode, out.stdout.strip(), out.stderr) == (0, seconds, "")


# --- the sbatch headers -----------------------------------------------------------------------------

def headers(name: str) -> dict[str, str]:
    text = (REPO / "slurm" / f"{name}.sh").read_text()
    return dict(m.groups("") for m in re.finditer(r"^#SBATCH --([a-z-]+)(?:=(\S+))?$", text, re.M))


def hours(limit: str) -> float:
    h, m, s = (int(x) for x in limit.split(":"))
    return h + m / 60 + s / 3600


def test_pretraining_headers_whole_nodes_24h_and_a_signal_lead_that_grows_with_the_model():
    leads = {}
    for name in PRETRAIN_SCRIPTS:
        h = headers(name)
        assert "exclusive" in h and h.get("mem") == "0", (name, h)  # all of each node's cores and memory
        assert hours(h["time"]) <= 24, (name, h["time"])  # common partition MaxTime; requeues chain the rest
        assert h["requeue"] == "" and h["signal"].startswith("B:USR1@"), (name, h)
        leads[name] = int(h["signal"].split("@")[1])
        assert leads[name] >= 300, (name, leads[name])
    for size in ("base", "large", "xl"):
        assert leads[f"tcd_{size}"] == leads[f"teacher_{size}"]
    assert leads["tcd_base"] < leads["tcd_large"] < leads["tcd_xl"], leads


# --- the token cache: no file locks, one rank builds ------------------------------------------------

def test_token_cache_builds_where_the_file_system_has_no_locks(tmp_path, vocab_file, monkeypatch, capsys):
    """Lustre mounted without `flock`: flock fails with ENOSYS. The cache is built anyway (the
    trainer's ranks wait at a barrier instead of relying on the lock); other lock errors still raise."""
    tok = load_tokenizer(str(vocab_file))
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(f"document {i} has a few words in it and some more" for i in range(20)) + "\n")

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    idx = build_token_cache(src, tok, tmp_path / "cache", 16, plain_text="paragraph", progress=False)
    assert read_index(idx).num_sequences > 1
    assert "no file locks" in capsys.readouterr().err
    assert build_token_cache(src, tok, tmp_path / "cache", 16, plain_text="paragraph", progress=False) == idx

    def broken(fd, op):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(locks.fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output error"):
        build_token_cache(src, tok, tmp_path / "cache2", 16, plain_text="paragraph", progress=False)


ONE_RANK_FIRST = r"""
import datetime, json, os, sys, time
import torch.distributed as td
from tcd_ds.dist import Layout, one_rank_first
rank, local, port, log, fail = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3,
                      timeout=datetime.timedelta(seconds=60))
def note(what):
    with open(log, "a") as f:
        f.write(f"{what} {rank} {time.time()}\n")
def build():
    note("start")
    time.sleep(1.0 if rank != 1 else 0.0)
    if fail and rank == 0:
        raise ValueError("corpus is too short")
    note("end")
    return f"built-by-{rank}"
try:
    out = {"result": one_rank_first(build, Layout(rank, 3, local, "127.0.0.1", port, "slurm"))}
except ValueError as err:
    out = {"error": str(err)}
print("RESULT " + json.dumps(out), flush=True)
td.barrier()  # every rank is done before any tears the group down: gloo can abort a process whose
td.destroy_process_group()  # peers closed their connections first (seen once in CI: SIGABRT at exit)
"""


def run_three_ranks(tmp_path: Path, fail: bool) -> tuple[dict[int, dict], list[tuple[str, int, float]]]:
    """Ranks 0 and 1 on one node (local ranks 0, 1), rank 2 on another (local rank 0)."""
    log = tmp_path / f"calls-{fail}.txt"
    port = dist.free_port()
    procs = {r: subprocess.Popen([sys.executable, "-c", ONE_RANK_FIRST, str(r), str(local), str(port), str(log),
                                  "1" if fail else "0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for r, local in ((0, 0), (1, 1), (2, 0))}
    results = {}
    for r, p in procs.items():
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out
        results[r] = json.loads(out.split("RESULT ", 1)[1])
    calls = [(w, int(r), float(t)) for w, r, t in (line.split() for line in log.read_text().splitlines())]
    return results, calls


@pytest.mark.slow
@pytest.mark.multiproc
def test_one_rank_builds_while_the_others_wait_at_a_barrier(tmp_path):
    results, calls = run_three_ranks(tmp_path, fail=False)
    assert results == {0: {"result": "built-by-0"}, 1: {"result": "built-by-1"}, 2: {"result": "built-by-2"}}
    when = {(w, r): t for w, r, t in calls}
    assert [(w, r) for w, r, _ in calls] == [("start", 0), ("end", 0), ("start", 2), ("end", 2),
                                             ("start", 1), ("end", 1)], calls
    assert when["start", 2] >= when["end", 0] and when["start", 1] >= when["end", 2]
    # rank 0 fails (a corpus too short): every rank raises its error, no other rank builds
    results, calls = run_three_ranks(tmp_path, fail=True)
    assert results == {r: {"error": "corpus is too short"} for r in range(3)}
    assert [(w, r) for w, r, _ in calls] == [("start", 0)]
