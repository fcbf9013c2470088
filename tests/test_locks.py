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
