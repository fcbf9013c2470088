"""Process layout from the launcher (deepspeed, torchrun, Slurm's srun, or none) and its setup.

The deepspeed launcher and torchrun export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT. Under `srun` (no ssh, one task per GPU) Slurm exports SLURM_PROCID / SLURM_LOCALID /
SLURM_NTASKS instead; the master address then comes from MASTER_ADDR if the batch script set it
(slurm/launch.sh resolves the first host of the allocation), else from the first host of
SLURM_JOB_NODELIST via `scontrol show hostnames` and `scontrol show node` (node names need not
resolve). A plain `python -m tcd_ds.train` is a world of one.
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_master_addr(env: dict[str, str]) -> str:
    """The first host of the allocation, resolved to an address (via Slurm when DNS cannot)."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    first = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                           check=True).stdout.split()[0]
    try:
        return socket.gethostbyname(first)
    except OSError:
        out = subprocess.run(["scontrol", "show", "node", first], capture_output=True, text=True, check=True).stdout
        for token in out.split():
            if token.startswith("NodeAddr="):
                return socket.gethostbyname(token.split("=", 1)[1])
        raise RuntimeError(f"cannot resolve the address of Slurm node {first}") from None


def detect_layout(env: dict[str, str] | None = None) -> Layout:
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return Layout(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                      env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "deepspeed/torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)
        addr = env.get("MASTER_ADDR") or slurm_master_addr(env)
        return Layout(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                      addr, port, "slurm")
    return Layout(0, 1, 0, "127.0.0.1", _free_port(), "single")


def device_for(layout: Layout) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", layout.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(layout: Layout, timeout_s: float = 600.0) -> torch.device:
    """Export the layout as the env:// variables and start DeepSpeed's process group."""
    import deepspeed

    os.environ.update(RANK=str(layout.rank), WORLD_SIZE=str(layout.world_size), LOCAL_RANK=str(layout.local_rank),
                      MASTER_ADDR=layout.master_addr, MASTER_PORT=str(layout.master_port))
    device = device_for(layout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               timeout=datetime.timedelta(seconds=timeout_s))
    return device
