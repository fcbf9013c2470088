"""One training at a time in a run dir (and one fine-tuning sweep in an out dir).

Two trainers started on the same `run_dir` (the same command typed twice, a job submitted again
while the first still runs, two experiment invocations reaching the same unit) would both resume
from the same checkpoint and then write their checkpoints, metrics and summary over each other's.
Global rank 0 holds an exclusive `fcntl.flock` on `<run_dir>/.run.lock` from before it chooses the
checkpoint to resume from until the run ends; a second trainer is refused with one line that names
the holder. The OS releases the lock when its process dies, so a crashed or killed run never leaves
a stale one, and a requeued Slurm job (its previous incarnation gone) takes it again. A fine-tuning
sweep (`python -m tcd_ds.finetune --out DIR`) holds its out dir alike: two sweeps appending to one
`runs.jsonl` would both run the seeds the other is running. Where the file
system has no locks (Lustre mounted without `flock`, some NFS) the run goes on unlocked, with a note.
"""
from __future__ import annotations

import errno
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks
    fcntl = None

LOCK_NAME = ".run.lock"
# flock on a file system without lock support: ENOSYS, EOPNOTSUPP, ENOLCK, EINVAL
NO_LOCK_ERRNOS = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}


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
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "holder unknown"
                handle.close()
                raise RunDirInUse(f"{'run' if kind == 'training' else 'out'} dir {run_dir} is in use by another {kind} "
                                  f"({holder}): wait for it to end, stop it"
                                  f"{' (SIGTERM saves a checkpoint)' if kind == 'training' else ''}, or choose "
                                  f"another {'run_dir' if kind == 'training' else 'dir'}") from None
            except OSError as err:
                if err.errno not in NO_LOCK_ERRNOS:
                    handle.close()
                    raise
                print(f"note: no file locks on the file system of {run_dir} ({os.strerror(err.errno)}): "
                      f"nothing stops a second {kind} in this dir", file=sys.stderr, flush=True)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        return cls(path, handle)

    def release(self) -> None:
        if not self._handle.closed:
            self._handle.close()  # closing the file releases the flock

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
