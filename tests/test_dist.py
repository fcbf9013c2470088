"""The rendezvous on a busy host: the README's quick start (no --master_port) while another job
holds port 29500, a taken port the user chose, how the user's choice is read from the launcher's
command line, and the one-line notice before DeepSpeed's first comm-op compile."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from tcd_ds import dist
from trainer_utils import REPO, free_port, quick

LAUNCH = ["/usr/bin/python3", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=",
          "--master_addr=127.0.0.1"]
SCRIPT_ARGS = ["tcd_ds/train.py", "--config", "tiny"]
RUNNER = ["/usr/bin/python3", "/venv/bin/deepspeed", "--num_accelerators", "2"]


@pytest.mark.parametrize("launch_port,runner_options,chosen", [
    ("29500", [], False),                              # the README quick start: the launcher's default
    ("29500", ["--master_port", "29500"], True),       # the default, but typed by the user
    ("29500", ["--master_port=29500"], True),
    ("29500", ["--master_p", "29500"], True),          # an argparse abbreviation
    ("29501", ["--master_port", "29501"], True),
    ("29500", ["--master_addr", "10.0.0.1"], False),   # another option, not the port
])
def test_port_chosen_by_user_reads_the_runner_options(launch_port, runner_options, chosen):
    launch = [*LAUNCH, f"--master_port={launch_port}", *SCRIPT_ARGS]
    runner = [*RUNNER[:2], *runner_options, *RUNNER[2:], *SCRIPT_ARGS]
    assert dist.port_chosen_by_user(launch, runner) is chosen


def test_port_chosen_by_user_only_trusts_a_recognised_runner():
    launch = [*LAUNCH, "--master_port=29500", *SCRIPT_ARGS]
    # the training script's own arguments never count; an unknown parent counts as a choice
    assert dist.port_chosen_by_user(launch, [*RUNNER, *SCRIPT_ARGS, "--master_port", "1"]) is False
    assert dist.port_chosen_by_user(launch, ["/bin/bash", "run.sh"]) is True
    assert dist.port_chosen_by_user([*LAUNCH, *SCRIPT_ARGS], []) is False  # launch.py's own default


def test_not_a_local_deepspeed_launch():
    # multi-node (CROSS_SIZE 2), torchrun, and a launcher that is not deepspeed's: their own ports
    assert dist.local_deepspeed_launch({"CROSS_SIZE": "2", "LOCAL_SIZE": "2", "WORLD_SIZE": "4"}) is None
    assert dist.local_deepspeed_launch({"CROSS_SIZE": "1", "LOCAL_SIZE": "2", "WORLD_SIZE": "2",
                                        "TORCHELASTIC_RUN_ID": "x"}) is None
    assert dist.local_deepspeed_launch({"CROSS_SIZE": "1", "LOCAL_SIZE": "2", "WORLD_SIZE": "2"}) is None  # pytest


def hold(port: int) -> socket.socket | None:
    """A listening socket on `port` (None when something else already holds it: held either way)."""
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", port))
    except OSError as err:
        s.close()
        if err.errno != errno.EADDRINUSE:
            raise
        return None
    s.listen()
    return s


def run(cmd: list[str], timeout: float = 500) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token_cache")


def stranger_store(port: int):
    """Another job's rendezvous store on `port` (None when something else already holds the port)."""
    import datetime

    from torch.distributed import TCPStore

    try:
        return TCPStore("127.0.0.1", port, 2, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    except RuntimeError as err:
        if "EADDRINUSE" not in str(err):
            raise
        return None


@pytest.mark.slow
@pytest.mark.multiproc
def test_quick_start_runs_while_another_job_holds_29500(shared_data, cache, tiny_teacher, tmp_path):
    """The README's command shape, unchanged (no --master_port), 2 ranks, while another job's store
    listens on 29500 (the launcher's default port): the run finishes and never touches that store."""
    stranger = stranger_store(29500)
    keys = stranger.num_keys() if stranger else None
    try:
        run_dir = tmp_path / "tcd"
        proc = run(["deepspeed", "--num_accelerators", "2", "tcd_ds/train.py", "--config", "tiny", "--mode", "tcd",
                    "--deepspeed_config", "auto",
                    *quick(shared_data, cache, run_dir, 3, f"teacher.path={tiny_teacher}")])
        if stranger:
            assert stranger.num_keys() == keys  # no rank of ours joined the other job's rendezvous
    finally:
        del stranger
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "EADDRINUSE" not in out and "Traceback" not in out
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    # rank 0 alone ends with the summary block; DeepSpeed's per-rank FutureWarning and its
    # "untested optimizer" warning are filtered
    assert proc.stdout.count("run finished: tcd, 3 steps, world 2:") == 1, proc.stdout[-3000:]
    assert f"  teacher      {tiny_teacher.resolve()}" in proc.stdout
    assert "all_gather_into_tensor` is deprecated" not in out and "untested optimizer" not in out


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_chosen_port_that_is_taken_is_one_line(tmp_path):
    port = free_port()
    held = hold(port)
    try:
        proc = run(["deepspeed", "--num_accelerators", "2", "--master_port", str(port), "tcd_ds/train.py",
                    "--config", "tiny", "--mode", "vanilla", "--deepspeed_config", "ds_configs/cpu_zero2.json",
                    f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"], timeout=300)
    finally:
        if held:
            held.close()
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: port {port} is already in use on this host (another job's rendezvous?); "
                      "pick a free one: deepspeed --master_port <free port> ..."], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_first_launch_announces_the_comm_op_compile(tmp_path, monkeypatch, capsys):
    layout = dist.Layout(0, 2, 0, "127.0.0.1", 1, "deepspeed/torchrun")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # a fresh environment: nothing built yet
    build_dir = dist.comm_op_build_dir()
    if build_dir is None:
        pytest.skip("this DeepSpeed build does not JIT-compile a CPU comm op here")
    assert build_dir == tmp_path / "deepspeed_shm_comm"
    dist.announce_comm_op_build(layout)
    dist.announce_comm_op_build(dist.Layout(1, 2, 1, "127.0.0.1", 1, "deepspeed/torchrun"))  # local rank 1: quiet
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("first launch in this environment: DeepSpeed compiles")
    assert "about 2 minutes, once" in lines[0] and str(build_dir) in lines[0]
    (build_dir / "deepspeed_shm_comm.so").write_bytes(b"")  # built: silent from then on
    assert dist.comm_op_build_dir() is None
    dist.announce_comm_op_build(layout)
    assert capsys.readouterr().err == ""


def test_comm_segments_left_by_earlier_runs_are_named_with_their_size(tmp_path, monkeypatch):
    """DeepSpeed's comm segments that no run unlinked hold RAM until removed: one note with their
    count and size and the command that frees them; this run's own, other users' and other files
    are not counted."""
    monkeypatch.setattr(dist, "SHM_DIR", tmp_path)
    assert dist.leftover_comm_segments_note() is None
    mine = dist.comm_segment(0, "127.0.0.1", 4242).name
    assert mine == f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_4242_0"
    for rank in (0, 1):
        with open(tmp_path / dist.comm_segment(rank, "127.0.0.1", 1111).name, "wb") as f:
            f.truncate(2**29)  # sparse: the size without the writing
        (tmp_path / dist.comm_segment(rank, "127.0.0.1", 4242).name).write_bytes(b"x")  # this run's own
    (tmp_path / f"deepspeed_allreduce_buffer_{os.getuid() + 1}_127.0.0.1_1111_0").write_bytes(b"x")  # another user
    (tmp_path / "torch_shm_123").write_bytes(b"x")
    note = dist.leftover_comm_segments_note(exclude=dist.comm_segment_prefix("127.0.0.1", 4242))
    assert note == (f"note: {tmp_path} holds 2 DeepSpeed comm segment(s) that earlier runs left behind, 1.0 GiB of "
                    f"RAM; once no DeepSpeed job runs on this host: rm {tmp_path}/deepspeed_allreduce_buffer_*")


def test_expert_groups_that_span_nodes_are_found():
    from tcd_ds.dist import expert_groups_across_nodes

    block = ["n1"] * 4 + ["n2"] * 4  # srun's default block distribution: consecutive ranks per node
    assert expert_groups_across_nodes(block, 4) == []
    assert expert_groups_across_nodes(block, 8) == [list(range(8))]  # ep_size above a node's ranks
    cyclic = ["n1", "n2"] * 4  # --distribution=cyclic: every group crosses the network
    assert expert_groups_across_nodes(cyclic, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert expert_groups_across_nodes(cyclic, 1) == []
    with pytest.raises(ValueError):
        expert_groups_across_nodes(block, 3)


@pytest.mark.multiproc
def test_a_lone_process_takes_another_port_when_its_own_was_taken(monkeypatch):
    """A single-process run picks its rendezvous port at start; another job can take it before the
    process group starts (seen: two premise trainers started side by side, one exited 2 'port
    already in use'). A lone process now takes a fresh port instead; launched ranks still refuse."""
    import torch.distributed as tdist

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "0")  # restored after the test: init_distributed writes them
    taken = hold(0)
    port = taken.getsockname()[1]
    try:
        layout = dist.Layout(0, 1, 0, "127.0.0.1", port, "single")
        dist.init_distributed(layout, timeout_s=30)
        assert os.environ["MASTER_PORT"] != str(port) and tdist.is_initialized()
        tdist.destroy_process_group()
        with pytest.raises(SystemExit) as err:
            dist.init_distributed(dist.Layout(0, 1, 0, "127.0.0.1", port, "deepspeed/torchrun"), timeout_s=30)
        assert err.value.code == 2
    finally:
        taken.close()
        if tdist.is_initialized():
            tdist.destroy_process_group()


@pytest.mark.multiproc
def test_a_rendezvous_that_fails_is_one_line_per_rank(monkeypatch, capsys):
    """Issue 27: a rank whose peers never arrive printed a raw torch traceback after the timeout; now one
    error line naming its rank, host and the rendezvous address, exit status 2."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "0")  # restored after the test: init_distributed writes them
    port = dist.free_port()
    with pytest.raises(SystemExit) as err:
        dist.init_distributed(dist.Layout(0, 2, 0, "127.0.0.1", port, "slurm"), timeout_s=3)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert err.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: rank 0/2 on ") and f"127.0.0.1:{port} did not complete within 3 s" in lines[0]
