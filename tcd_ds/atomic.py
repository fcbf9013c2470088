"""Crash-safe file writes: a temporary file in the same directory, fsync, then an atomic rename (a
whole directory alike: `publish_dir`); and `read_json` / `read_jsonl`, the tolerant readers of the
JSON (lines) files a run, a sweep or an experiment leaves behind.

Every file written here gets the mode of any file the user creates (0666 minus the umask, usually
0644), also when the library that fills the temporary file creates it private (safetensors'
`save_file` writes through a 0600 temporary file, the way `mkstemp` does).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from tcd_ds.locks import build_lock


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def user_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_atomic(path: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """`fill(tmp)` writes the whole content to the temporary `tmp`; then it gets the user's file
    mode, reaches the disk, and replaces `path` in one rename (a crash leaves the old `path`)."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        fill(tmp)
        os.chmod(tmp, user_file_mode())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Create directory ``final`` atomically: ``build`` fills a hidden temporary sibling, whose files
    reach the disk before it is renamed into place, under a lock (concurrent callers build once; the
    others wait and reuse). An existing ``final`` is kept as it is."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir():
        return final
    with build_lock(final.parent / f"{final.name}.lock"):
        if final.is_dir():  # built by another process while we waited
            return final
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            build(tmp)
            for f in tmp.rglob("*"):
                if f.is_file() and not f.is_symlink():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`path` holds either its old content or all of `text`, never a partial write."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The parsed content of the JSON file `path`, or None when it is missing, unreadable or not
    valid JSON (a unit that has not finished, a file cut off by a crash before atomic writes)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def read_jsonl(path: str | os.PathLike, on_bad: Callable[[int, str], None] | None = None) -> list[Any]:
    """The records of the JSON-lines file `path` ([] when it is missing), in file order. Appended
    files are not written atomically, so a line that is not JSON (cut off by a crash mid-write) is
    skipped, after `on_bad(line number, line)` when given; blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if on_bad is not None:
                on_bad(lineno, line)
    return records


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, crash-safe and with the user's file mode (not 0600)."""
    from safetensors.torch import save_file

    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
