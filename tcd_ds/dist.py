"""Process layout from the launcher (deepspeed, torchrun, Slurm's srun, or none) and its setup.

The deepspeed launcher and torchrun export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT. Under `srun` (no ssh, one task per GPU) Slurm exports SLURM_PROCID / SLURM_LOCALID /
SLURM_NTASKS instead; the master address then comes from MASTER_ADDR if the batch script set it
(slurm/launch.sh resolves the first host of the allocation), else from the first host of
SLURM_JOB_NODELIST via `scontrol show hostnames` and `scontrol show node` (node names need not
resolve; a loopback answer is never used when the job spans nodes), on port `slurm_master_port`.
A plain `python -m tcd_ds.train` is a world of one.

A busy host (another job on the launcher's default port 29500): under a single-node `deepspeed`
launch (all ranks children of one `deepspeed.launcher.launch` process) the ranks never trust the
port blindly. Rank 0 opens the rendezvous store itself -- on a free port the OS picks when the user
did not choose one (the launcher's default 29500, no `--master_port` on the `deepspeed` command
line, read from /proc), else on the user's port -- and publishes the port in a file keyed by the
launcher's PID and start time (`rendezvous_file`); the other local ranks wait for that file, so they
only ever connect to their own rank 0, never to a stranger's store. A port the user chose that is
taken ends the run with one `error:` line naming `--master_port` and exit status 2. Multi-node,
torchrun and Slurm launches keep their own ports (a taken one: the same one line from rank 0).
"""
from __future__ import annotations

import atexit
import datetime
import ipaddress
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tcd_ds.cli import fail, print_error


@dataclass(frozen=True)
class Layout:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # deepspeed/torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the one helper for it in the package)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_master_port(job_id: int) -> int:
    """The rendezvous port of Slurm job `job_id`: stable across its requeues, distinct for concurrent
    jobs, in 10000-29999 (below the Linux ephemeral range, 32768+). slurm/launch.sh: tcd_master_port
    computes the same."""
    return 10000 + job_id % 20000


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def _route_source(dest: str) -> str | None:
    """The source address this host would use to reach IPv4 `dest` (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((dest, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def local_address() -> str | None:
    """This host's non-loopback IPv4 address: the source of its route to slurmctld, else of its
    default route, else the first of `hostname -I` (slurm/launch.sh: tcd_local_addr)."""
    candidates = []
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
        for line in out.splitlines():
            if line.startswith("SlurmctldHost[0]"):
                host = line.split("=", 1)[1].strip()
                host = host.split("(", 1)[1].rstrip(")") if "(" in host else host
                candidates.append(_route_source(socket.gethostbyname(host)))
                break
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    candidates.append(_route_source("1.1.1.1"))
    try:
        candidates += subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    for addr in candidates:
        if addr and ":" not in addr and not is_loopback(addr):
            return addr
    return None


def _resolve_node(name: str) -> list[str]:
    """IPv4 addresses of Slurm node `name`: DNS, else its NodeAddr in `scontrol show node`."""
    try:
        return list(dict.fromkeys(a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)))
    except OSError:
        pass
    out = subprocess.run(["scontrol", "show", "node", name], capture_output=True, text=True, check=True).stdout
    for token in out.split():
        if token.startswith("NodeAddr="):
            try:
                return [socket.gethostbyname(token.split("=", 1)[1])]
            except OSError:
                break
    raise RuntimeError(f"cannot resolve the address of Slurm node {name}")


def slurm_master_addr(env: dict[str, str]) -> str:
    """The first host of the allocation, resolved to an address (via Slurm when DNS cannot). Never a
    loopback address when the job spans nodes (a node's own name often maps to 127.0.1.1): the first
    node itself then uses its own non-loopback address; a rank elsewhere cannot learn it and stops
    with an error naming MASTER_ADDR."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                           check=True).stdout.split()
    first = hosts[0]
    addrs = _resolve_node(first)
    if len(hosts) == 1:
        return addrs[0]
    routable = [a for a in addrs if not is_loopback(a)]
    if routable:
        return routable[0]
    own = local_address() if env.get("SLURMD_NODENAME") == first else None
    if own is None:
        raise RuntimeError(f"Slurm node {first} resolves to loopback ({addrs[0]}) and the job spans "
                           f"{len(hosts)} nodes: export MASTER_ADDR=<its address> before srun (slurm/launch.sh: "
                           f"tcd_train does)")
    return own


def detect_layout(env: dict[str, str] | None = None) -> Layout:
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return Layout(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                      env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "deepspeed/torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        port = int(env.get("MASTER_PORT") or slurm_master_port(int(env.get("SLURM_JOB_ID", 0))))
        addr = env.get("MASTER_ADDR") or slurm_master_addr(env)
        return Layout(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                      addr, port, "slurm")
    return Layout(0, 1, 0, "127.0.0.1", free_port(), "single")


def device_for(layout: Layout) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", layout.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# --- work done once: one rank builds, the others wait at a barrier --------------------------------

BUILD_TIMEOUT_S = 48 * 3600.0  # how long the other ranks wait for rank 0's build (e.g. tokenising a corpus)


def one_rank_first(fn, layout: Layout, timeout_s: float = BUILD_TIMEOUT_S):
    """Return `fn()` on every rank, where `fn` builds something on disk or reuses what is there (the
    token cache, the fallback corpus and vocab). Global rank 0 calls it first while the others wait
    at a barrier; then local rank 0 of every other node (a cache dir that is not shared between
    nodes); then the rest, which find it built. No cross-node file lock is needed (flock fails on
    Lustre without `flock`). An error of a phase is raised on every rank, the later phases skipped.
    The barrier runs on its own gloo group, with a timeout that a long build does not reach."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = None
        phases = (layout.rank == 0, layout.rank != 0 and layout.local_rank == 0, layout.local_rank != 0)
        for mine in phases:
            error = None
            if mine:
                try:
                    result = fn()
                except Exception as err:  # noqa: BLE001 -- raised on every rank below
                    error = err
                    try:
                        pickle.dumps(err)
                    except Exception:  # noqa: BLE001
                        error = RuntimeError(str(err))
            errors: list = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error, group=group)
            first = next((e for e in errors if e is not None), None)
            if first is not None:
                raise error if error is not None else first
        return result
    finally:
        dist.destroy_process_group(group)


def close_ranks() -> None:
    """The end of a rank that finished its work: meet the others, then close the process group. A
    rank left to tear its communicators down at interpreter exit could abort there ("terminate
    called without an active exception", SIGABRT) after a correct run: seen on 2 CPU ranks in bf16,
    in 2 of 3 two-step runs."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        import deepspeed.comm as ds_comm

        ds_comm.destroy_process_group()


# --- the port: chosen by the user, or free -------------------------------------------------------

LAUNCHER_DEFAULT_PORT = 29500  # deepspeed's (and torch's) default master port
LAUNCH_MODULE = "deepspeed.launcher.launch"  # the per-node process that spawns the local ranks


def port_clash(port: int, how: str = "deepspeed --master_port <free port> ...") -> SystemExit:
    """The rendezvous port is taken: print one line naming the way out; raise the result (status 2)."""
    print_error(f"port {port} is already in use on this host (another job's rendezvous?); pick a free one: {how}")
    return SystemExit(2)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on; [1] is the parent PID, [19] the start time."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _option(argv: list[str], name: str) -> str | None:
    """The value of `--name=value` / `--name value` (or an argparse abbreviation of it) in argv."""
    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=")
        if key.startswith("--") and len(key) >= len(name) - 3 and name.startswith(key):
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return None


def port_chosen_by_user(launch_argv: list[str], runner_argv: list[str]) -> bool:
    """Whether the master port that `deepspeed.launcher.launch` got (`launch_argv`) is the user's
    choice. The `deepspeed` runner (`runner_argv`, the launch process's parent) always passes
    `--master_port=N` on; N is only the launcher's default when it is 29500 and the runner's own
    options (those before the training script) have no `--master_port`. Anything unrecognised
    counts as chosen (then a taken port is an error, never silently replaced)."""
    port = _option(launch_argv, "--master_port")
    if port is None:  # launch.py run by hand without one: its own default
        return False
    if port != str(LAUNCHER_DEFAULT_PORT):
        return True
    after = launch_argv[launch_argv.index(LAUNCH_MODULE) + 1:] if LAUNCH_MODULE in launch_argv else []
    script = next((a for a in after if not a.startswith("--")), None)
    is_runner = any(os.path.basename(a) in ("deepspeed", "ds") or a == "deepspeed.launcher.runner"
                    for a in runner_argv[:3])
    if not is_runner or script is None or script not in runner_argv:
        return True
    own = runner_argv[:runner_argv.index(script)]
    return _option(own[1:], "--master_port") is not None


def local_deepspeed_launch(env: dict[str, str] | None = None) -> tuple[int, bool] | None:
    """(launcher PID, port chosen by the user) when every rank of this job is a child of one
    `deepspeed.launcher.launch` process on this host; None otherwise (multi-node, torchrun, Slurm)."""
    env = os.environ if env is None else env
    if env.get("CROSS_SIZE") != "1" or env.get("LOCAL_SIZE") != env.get("WORLD_SIZE") or "TORCHELASTIC_RUN_ID" in env:
        return None
    launcher = os.getppid()
    launch_argv = _cmdline(launcher)
    if LAUNCH_MODULE not in launch_argv:
        return None
    stat = _stat(launcher)
    runner_argv = _cmdline(int(stat[1])) if stat else []
    return launcher, port_chosen_by_user(launch_argv, runner_argv)


def rendezvous_file(launcher_pid: int) -> Path:
    """Where rank 0 of the ranks spawned by `launcher_pid` publishes its store's port (private to the
    user; the key holds the boot id and the launcher's start time, so a reused PID never matches)."""
    root = Path(tempfile.gettempdir()) / f"tcd_ds-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    if root.stat().st_uid != os.getuid():
        raise RuntimeError(f"{root} belongs to another user: remove it, or set TMPDIR to a private directory")
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = "noboot"
    stat = _stat(launcher_pid)
    return root / f"rendezvous-{boot}-{launcher_pid}-{stat[19] if len(stat) > 19 else 0}.json"


def _publish(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    for old in path.parent.glob("rendezvous-*.json"):  # files of launchers that are gone
        try:
            if not Path(f"/proc/{old.name.split('-')[2]}").exists():
                old.unlink()
        except (OSError, IndexError):
            pass


def _wait_published(path: Path, launcher_pid: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
        if os.getppid() != launcher_pid:  # the launcher is gone: nothing to wait for
            raise SystemExit(2)
        if time.monotonic() > deadline:
            fail(f"local rank 0 did not publish its rendezvous port in {path} within {timeout_s:.0f} s")
        time.sleep(0.05)


def _local_store(layout: Layout, launcher_pid: int, chosen: bool, timeout: datetime.timedelta):
    """The rendezvous store of a single-node deepspeed launch: rank 0 serves it (on the user's port,
    or a free one), the other ranks connect to the port rank 0 published. Returns (store, port)."""
    from torch.distributed import TCPStore

    path = rendezvous_file(launcher_pid)
    if layout.rank == 0:
        # kept while the run lives (a rank may read it late, e.g. NCCL connects lazily); removed at
        # exit, or by a later launch once this launcher is gone
        atexit.register(path.unlink, missing_ok=True)
        port = layout.master_port if chosen else 0
        try:
            store = TCPStore(layout.master_addr, port, layout.world_size, True, timeout=timeout,
                             wait_for_workers=False)
        except RuntimeError as err:  # DistNetworkError: EADDRINUSE
            _publish(path, {"error": str(err).splitlines()[0]})
            if "EADDRINUSE" in str(err) or "in use" in str(err):
                raise port_clash(port) from None
            raise
        _publish(path, {"port": store.port, "pid": os.getpid()})
        return store, store.port
    info = _wait_published(path, launcher_pid, timeout.total_seconds())
    if "error" in info:  # rank 0 says why (one line, from rank 0 only)
        raise SystemExit(2)
    return TCPStore(layout.master_addr, int(info["port"]), layout.world_size, False, timeout=timeout), int(info["port"])


# --- DeepSpeed's CPU comm op: built on first use -----------------------------------------------

def comm_op_build_dir() -> Path | None:
    """The directory torch's JIT build will compile DeepSpeed's CPU shared-memory comm op into at
    this launch, or None when nothing needs compiling (already built, preinstalled, or not used)."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import _get_build_directory

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            return None
        if installed_ops.get(builder.name, False):
            return None
        build_dir = Path(_get_build_directory(builder.name, verbose=False))
        return None if (build_dir / f"{builder.name}.so").is_file() else build_dir
    except Exception:  # noqa: BLE001 -- a notice only: never fail a launch over it
        return None


def announce_comm_op_build(layout: Layout) -> None:
    """One line before DeepSpeed compiles its CPU comm op (about 2 minutes, once per environment),
    from local rank 0; a missing C++ compiler is one `error:` line instead of a compiler traceback."""
    build_dir = comm_op_build_dir()
    if build_dir is None:
        return
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        if layout.local_rank == 0:
            print_error(f"DeepSpeed must compile its CPU comm op (deepspeed_shm_comm) on the first launch in "
                        f"this environment, but there is no C++ compiler ({cxx}, g++) on PATH: install g++ "
                        f"(e.g. apt-get install g++)")
        raise SystemExit(2)
    if layout.local_rank == 0:
        print(f"first launch in this environment: DeepSpeed compiles its CPU shared-memory comm op "
              f"(deepspeed_shm_comm) with g++ into {build_dir}; about 2 minutes, once", file=sys.stderr, flush=True)


def rendezvous_failed(layout: Layout, port: int, err: BaseException, timeout_s: float) -> SystemExit:
    """One `error:` line for this rank (its rank and host, the rendezvous address, what torch said)
    instead of a raw traceback from every rank; exit status 2."""
    why = (str(err).strip().splitlines() or [type(err).__name__])[0]
    print(f"error: rank {layout.rank}/{layout.world_size} on {socket.gethostname()}: the rendezvous at "
          f"{layout.master_addr}:{port} did not complete within {timeout_s:.0f} s ({why}): check that every rank "
          "started and can reach that address (MASTER_ADDR, a firewall, GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)",
          file=sys.stderr, flush=True)
    return SystemExit(2)


def init_distributed(layout: Layout, timeout_s: float = 600.0) -> torch.device:
    """Export the layout as the env:// variables and start DeepSpeed's process group (on a port no
    other job holds, see the module docstring)."""
    import deepspeed

    timeout = datetime.timedelta(seconds=timeout_s)
    device = device_for(layout)
    backend = "nccl" if device.type == "cuda" else "gloo"
    local = local_deepspeed_launch() if layout.launcher == "deepspeed/torchrun" and layout.world_size > 1 else None
    store, port = (None, layout.master_port) if local is None else _local_store(layout, *local, timeout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    announce_comm_op_build(layout)
    # a lone process's port is its own choice: one taken since it was picked (another job's process
    # got it meanwhile) is replaced by a fresh one, a few times, instead of failing the run
    tries = 5 if layout.launcher == "single" else 1
    for attempt in range(tries):
        if attempt:
            port = free_port()
        # MASTER_PORT also names DeepSpeed's shared-memory segments: the port in use, never the default
        os.environ.update(RANK=str(layout.rank), WORLD_SIZE=str(layout.world_size), LOCAL_RANK=str(layout.local_rank),
                          MASTER_ADDR=layout.master_addr, MASTER_PORT=str(port))
        try:
            if store is not None:
                torch.distributed.init_process_group(backend, store=store, rank=layout.rank,
                                                     world_size=layout.world_size, timeout=timeout)
            deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
            break
        except torch.distributed.DistError as err:
            if "EADDRINUSE" not in str(err):
                raise rendezvous_failed(layout, port, err, timeout_s) from None
            if attempt + 1 < tries:
                continue
            how = ("TCD_MASTER_PORT=<free port> (slurm/launch.sh) or MASTER_PORT" if layout.launcher == "slurm"
                   else "deepspeed --master_port <free port> (torchrun: --master_port)")
            raise port_clash(port, how) from None
    if device.type == "cpu":  # the shm comm op is the CPU accelerator's alone
        unlink_comm_segment(layout, port)
    if layout.local_rank == 0 and (note := leftover_comm_segments_note(comm_segment_prefix(layout.master_addr, port))):
        print(note, file=sys.stderr, flush=True)
    return device


SHM_DIR = Path("/dev/shm")
SHM_SEGMENT = "deepspeed_allreduce_buffer"  # SHM_BUFFER_NAME in DeepSpeed's csrc/cpu/comm/shm.cpp


def comm_segment_prefix(addr: str, port: int) -> str:
    """The name DeepSpeed's CPU comm op gives a run's shared-memory segments when all its ranks are
    on one host, less the rank: `<name>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_`."""
    return f"{SHM_SEGMENT}_{os.getuid()}_{addr}_{port}_"


def comm_segment(rank: int, addr: str, port: int) -> Path:
    """Rank `rank`'s segment (66 MB)."""
    return SHM_DIR / f"{comm_segment_prefix(addr, port)}{rank}"


def unlink_comm_segment(layout: Layout, port: int) -> None:
    """DeepSpeed maps one shared-memory segment per rank at init and never unlinks it (shm.cpp's
    shared_close is never called), so each 2-rank CPU run left 132 MB of RAM in /dev/shm after it
    ended: 22 GB after a day of runs on one host, until a test run was killed for memory. Once every
    rank has mapped every segment (the barrier: a rank's init returns only after it opened the
    others'), the names are no longer needed: each rank unlinks its own, and the memory goes with
    the last process that maps it, a run killed by SIGKILL included."""
    segment = comm_segment(layout.rank, layout.master_addr, port)
    if layout.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    segment.unlink(missing_ok=True)


def comm_segments() -> list[Path]:
    """This user's DeepSpeed comm segments now named in /dev/shm, of any run."""
    return sorted(SHM_DIR.glob(f"{SHM_SEGMENT}_{os.getuid()}_*"))


def leftover_comm_segments_note(exclude: str = "") -> str | None:
    """One line when /dev/shm holds this user's DeepSpeed comm segments that no run unlinked (left by
    other DeepSpeed code, or by tcd-ds before `unlink_comm_segment`): RAM that stays taken until
    someone removes them. `exclude`: the name prefix of this run's own segments."""
    try:
        found = [p for p in comm_segments() if not (exclude and p.name.startswith(exclude))]
        size = sum(p.stat().st_size for p in found)
    except OSError:
        return None
    if not found:
        return None
    return (f"note: {SHM_DIR} holds {len(found)} DeepSpeed comm segment(s) that earlier runs left behind, "
            f"{size / 2**30:.1f} GiB of RAM; once no DeepSpeed job runs on this host: "
            f"rm {SHM_DIR}/{SHM_SEGMENT}_*")


def expert_groups_across_nodes(hosts: list[str], ep_size: int) -> list[list[int]]:
    """The expert-parallel groups whose ranks are not all on one node. DeepSpeed-MoE makes each group
    of `ep_size` consecutive ranks one expert-parallel group (ranks 0..ep-1, ep..2ep-1, ...), whose
    all-to-all should stay inside a node (NVLink); `hosts[r]` is rank r's host name."""
    if ep_size < 1 or len(hosts) % ep_size:
        raise ValueError(f"ep_size={ep_size} does not divide the world size {len(hosts)}")
    groups = [list(range(start, start + ep_size)) for start in range(0, len(hosts), ep_size)]
    return [g for g in groups if len({hosts[r] for r in g}) > 1]


def check_expert_groups_local(ep_size: int) -> str | None:
    """Gathers every rank's host name (a collective: call it on all ranks) and returns one warning
    line when an expert-parallel group spans nodes (ranks placed round-robin over nodes, or
    ep_size above the GPUs of a node), else None."""
    if ep_size <= 1 or not torch.distributed.is_initialized():
        return None
    hosts: list[str] = [""] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    spanning = expert_groups_across_nodes(hosts, ep_size)
    if not spanning:
        return None
    g = spanning[0]
    return (f"warning: {len(spanning)} expert-parallel group(s) of model.moe.ep_size={ep_size} span nodes "
            f"(e.g. ranks {g[0]}-{g[-1]} on {', '.join(sorted({hosts[r] for r in g}))}): their all-to-all "
            "crosses the network; place consecutive ranks on one node (srun --distribution=block) and keep "
            "ep_size <= GPUs per node")

