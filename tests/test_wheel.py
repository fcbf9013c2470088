"""The package installs as a wheel (no `-e`, no checkout beside it) and trains: its DeepSpeed configs and
recipes are package data and `tcd_ds/resources.py` finds them (`--deepspeed_config auto`, recipes by
name, `ds_configs/<name>.json` as the documentation writes it).

The wheel is built from a copy of the repo (nothing is written into the checkout) with the installed
setuptools (`--no-build-isolation`: no download), installed with `--no-deps --no-index` into a fresh
venv that sees the system's torch and DeepSpeed (`--system-site-packages`), and run from a directory
outside the repo with PYTHONPATH unset."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_utils import LAUNCH_ENV, REPO, quick

BUILD_INPUTS = ("pyproject.toml", "README.md", "tcd_ds")


def _run(cmd: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(the venv's python, an environment without PYTHONPATH) with the wheel of this checkout installed."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in BUILD_INPUTS:
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(item, src / name)
    # a fresh shell's environment: no launcher variables (RANK, MASTER_PORT, ...) from this session
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV", *LAUNCH_ENV)}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", root / "dist"], src, env)
    wheels = list((root / "dist").glob("tcd_ds-*.whl"))
    assert len(wheels) == 1, wheels
    _run([sys.executable, "-m", "venv", "--system-site-packages", root / "venv"], root, env)
    python = root / "venv" / "bin" / "python"
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheels[0]], root, env)
    return python, env


@pytest.mark.slow
@pytest.mark.multiproc
def test_the_installed_wheel_trains_two_tiny_steps_with_auto(installed, shared_data, tmp_path):
    python, env = installed
    elsewhere = tmp_path / "elsewhere"  # no tcd_ds/ nor ds_configs/ here
    elsewhere.mkdir()
    where = _run([python, "-c", "import tcd_ds.resources as r; print(r.PACKAGE); print(r.ds_config('ds_configs/cpu_zero2.json'))"],
                 elsewhere, env).stdout.split()
    venv = python.parent.parent
    assert Path(where[0]).is_relative_to(venv), where  # the wheel's copy, not the checkout nor the editable install
    assert Path(where[1]) == Path(where[0]) / "ds_configs" / "cpu_zero2.json" and Path(where[1]).is_file()

    run_dir = tmp_path / "run"
    args = ["--config", "tiny", "--mode", "vanilla", "--deepspeed_config", "auto", "--resume", "none",
            *quick(shared_data, tmp_path / "cache", run_dir, 2)]
    proc = subprocess.run([str(python), "-m", "tcd_ds.train", *args], cwd=elsewhere, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    chosen = next(line for line in proc.stderr.splitlines() if line.startswith("--deepspeed_config auto: "))
    assert Path(chosen.split(": ", 1)[1]).is_relative_to(venv), chosen
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["mode"] == "vanilla"


def test_ds_config_names_resolve_from_any_directory(tmp_path, monkeypatch):
    from tcd_ds import resources

    monkeypatch.chdir(tmp_path)
    shipped = resources.DS_CONFIGS / "cpu_zero2.json"
    for name in ("ds_configs/cpu_zero2.json", "cpu_zero2.json", "cpu_zero2"):
        assert resources.ds_config(name) == str(shipped), name
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "cpu_zero2.json").write_text("{}")  # the user's own file wins, relative to the cwd
    assert resources.ds_config("ds_configs/cpu_zero2.json") == "ds_configs/cpu_zero2.json"
    assert resources.ds_config("nope.json") == "nope.json"  # left to the caller to report
    assert (REPO / "ds_configs" / "cpu_zero2.json").read_text() == shipped.read_text()  # the checkout's link
