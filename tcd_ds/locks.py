"""File locks, two kinds, on one `fcntl.flock` with one fallback.

`build_lock(path)`: one process builds (a token cache, the fallback corpus and vocab), the others
wait and then reuse what it published by atomic rename.

`RunDirLock`: one training at a time in a run dir (and one fine-tuning sweep in an out dir); a
second is refused. Two trainers started on the same `run_dir` (the same command typed twice, a job
submitted again while the first still runs, two experiment invocations reaching the same unit)
would both resume from the same checkpoint and then write their checkpoints, metrics and summary
over each other's. Global rank 0 holds `<run_dir>/.run.lock` from before it chooses the checkpoint
to resume from until the run ends; a second trainer is refused with one line that names the holder.
A fine-tuning sweep (`python -m tcd_ds.finetune --out DIR`) holds its out dir alike: two sweeps
appending to one `runs.jsonl` would both run the seeds the other is running.

The OS releases a lock when its process dies, so a crashed or killed run never leaves a stale one,
and a requeued Slurm job (its previous incarnation gone) takes it again. After a node failure a
shared file system may keep the dead node's lock (NFSv3, Lustre): a lock whose holder line names an
earlier incarnation of the same Slurm job (same job id, lower SLURM_RESTART_COUNT) is taken over,
with one note. Where the file system has
no locks (Lustre mounted without `flock`, some NFS) both go on unlocked, with one note per dir: the
trainer's ranks never rely on the build lock (one rank builds while the others wait at a barrier,
`tcd_ds.dist.one_rank_first`), and two unlocked builders of one key only duplicate work.
"""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks
    fcntl = None

LOCK_NAME = ".run.lock"
# flock on a file system without lock support: ENOSYS, EOPNOTSUPP, ENOLCK, EINVAL
NO_LOCK_ERRNOS = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}
_unlocked_noted: set[str] = set()


def _flock(handle, path: Path, blocking: bool, unlocked: str) -> bool:
    """Lock the open file `path` exclusively: True; False where the file system has no locks (with
    one note per dir saying `unlocked`, what that means). Not `blocking`: BlockingIOError while
    another process holds it."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError as err:
        if err.errno not in NO_LOCK_ERRNOS:  # BlockingIOError (EAGAIN: held elsewhere) is raised too
            raise
        if str(path.parent) not in _unlocked_noted:
            _unlocked_noted.add(str(path.parent))
            print(f"note: no file locks on the file system of {path.parent} ({os.strerror(err.errno)}): "
                  f"{unlocked}", file=sys.stderr, flush=True)
        return False


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Hold `path` exclusively for the block, waiting for another holder to finish."""
    with open(path, "a+b") as f:
        locked = _flock(f, path, blocking=True, unlocked="building without one")
        try:
            yield
        finally:
            if locked:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class RunDirInUse(RuntimeError):
    """Another live process trains in this run dir."""


class RunDirLock:
    """The held lock of one run dir (`acquire`); `release()` ends it (also at process exit)."""

    def __init__(self, path: Path, handle):
        self.path, self._handle = path, handle

    @classmethod
    def acquire(cls, run_dir: Path, kind: str = "training") -> RunDirLock:
        """Hold `run_dir` for this process; `kind` names the holder's work in the refusal."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        handle = open(path, "a+")
        try:
            _flock(handle, path, blocking=False, unlocked=f"nothing stops a second {kind} in this dir")
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "holder unknown"
            handle.close()
            if _earlier_incarnation(holder, os.environ):
                return cls._take_over(path, holder, kind)
            raise RunDirInUse(f"{'run' if kind == 'training' else 'out'} dir {run_dir} is in use by another {kind} "
                              f"({holder}): wait for it to end, stop it"
                              f"{' (SIGTERM saves a checkpoint)' if kind == 'training' else ''}, or choose "
                              f"another {'run_dir' if kind == 'training' else 'dir'}") from None
        except OSError:
            handle.close()
            raise
        return cls._held(path, handle)

    @classmethod
    def _held(cls, path: Path, handle) -> RunDirLock:
        handle.seek(0)
        handle.truncate()
        job = os.environ.get("SLURM_JOB_ID")
        slurm = f" (slurm job {job} restart {os.environ.get('SLURM_RESTART_COUNT', '0')})" if job else ""
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                     f"{slurm}\n")
        handle.flush()
        return cls(path, handle)

    @classmethod
    def _take_over(cls, path: Path, holder: str, kind: str) -> RunDirLock:
        """The lock of this Slurm job's earlier incarnation, still held after it died (a node failure:
        NFSv3 and Lustre keep a dead client's locks until they time out): a fresh lock file replaces
        it (a new inode, which that lock does not cover) and is locked, with one note."""
        fresh = path.with_name(f"{path.name}.{os.getpid()}")
        handle = open(fresh, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(fresh, path)
        except OSError:
            handle.close()
            fresh.unlink(missing_ok=True)
            raise
        print(f"note: {path.parent} was still locked by this Slurm job's earlier run ({holder}): gone with its node, "
              f"its lock is taken over", file=sys.stderr, flush=True)
        return cls._held(path, handle)

    def release(self) -> None:
        if not self._handle.closed:
            self._handle.close()  # closing the file releases the flock

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _earlier_incarnation(holder: str, env) -> bool:
    """Whether the lock's holder line names an earlier run of this very Slurm job (the same job id, a
    lower restart count): Slurm runs one incarnation of a job at a time, so that holder is dead."""
    import re

    m = re.search(r"\(slurm job (\S+) restart (\d+)\)", holder)
    job, restart = env.get("SLURM_JOB_ID"), env.get("SLURM_RESTART_COUNT", "0")
    return bool(m and job and m.group(1) == job and restart.isdigit() and int(m.group(2)) < int(restart))
