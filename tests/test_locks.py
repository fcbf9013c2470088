"""`tcd_ds/locks.py` on its own: a held dir refuses a second holder, with who holds it; release
frees it; a file system without locks runs unlocked, with a note; other lock errors are raised.
(The trainer and fine-tuning against a holder in another process: test_reliability, test_finetune.)"""
from __future__ import annotations

import errno
import os

import pytest

from tcd_ds import locks
from tcd_ds.locks import RunDirInUse, RunDirLock


def test_a_held_dir_refuses_a_second_holder_until_released(tmp_path):
    first = RunDirLock.acquire(tmp_path / "run")
    assert (tmp_path / "run" / ".run.lock").read_text().startswith(f"pid {os.getpid()} on ")
    with pytest.raises(RunDirInUse, match=rf"run dir {tmp_path / 'run'} is in use by another training \(pid "
                                          rf"{os.getpid()} on .* since 20\d\d-"):
        RunDirLock.acquire(tmp_path / "run")
    with pytest.raises(RunDirInUse, match="out dir .* in use by another fine-tuning .*or choose another dir$"):
        RunDirLock.acquire(tmp_path / "run", "fine-tuning")
    first.release()
    with RunDirLock.acquire(tmp_path / "run") as again:
        assert again.path == tmp_path / "run" / ".run.lock"
    RunDirLock.acquire(tmp_path / "run").release()  # the with block released it


@pytest.mark.parametrize("code", sorted(locks.NO_LOCK_ERRNOS))
def test_no_locks_on_the_file_system_runs_unlocked_with_a_note(code, tmp_path, monkeypatch, capsys):
    def flock(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(locks.fcntl, "flock", flock)
    RunDirLock.acquire(tmp_path).release()
    assert f"note: no file locks on the file system of {tmp_path}" in capsys.readouterr().err


def test_another_lock_error_is_raised(tmp_path, monkeypatch):
    def flock(fd, op):
        raise OSError(errno.EBADF, "bad file descriptor")

    monkeypatch.setattr(locks.fcntl, "flock", flock)
    with pytest.raises(OSError, match="bad file descriptor"):
        RunDirLock.acquire(tmp_path)


def test_a_requeued_job_takes_over_its_earlier_incarnations_lock(tmp_path, monkeypatch, capsys):
    """Issue 27: after a node failure NFSv3 / Lustre keep the dead client's lock; the requeued job (same
    Slurm job id, a higher SLURM_RESTART_COUNT) exited 2 'run dir in use' and the chain ended. It now
    takes the lock over with one note; another job, or the same incarnation again, is still refused."""
    run = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    dead = RunDirLock.acquire(run)  # still held: the lock of a node that is gone
    assert (run / ".run.lock").read_text().rstrip().endswith("(slurm job 123 restart 0)")
    with pytest.raises(RunDirInUse):  # the same incarnation (a second srun step in the job): a live holder
        RunDirLock.acquire(run)
    monkeypatch.setenv("SLURM_JOB_ID", "124")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(RunDirInUse):  # another job
        RunDirLock.acquire(run)
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    capsys.readouterr()
    requeued = RunDirLock.acquire(run)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: ") and "taken over" in err[0] and "restart 0" in err[0]
    assert (run / ".run.lock").read_text().rstrip().endswith("(slurm job 123 restart 1)")
    monkeypatch.setenv("SLURM_JOB_ID", "125")
    with pytest.raises(RunDirInUse):  # the new holder is refused to another job alike
        RunDirLock.acquire(run)
    assert sorted(p.name for p in run.iterdir()) == [".run.lock"]
    requeued.release()
    dead.release()
