"""Where the package's own files are, in a checkout, an editable install or an installed wheel: the
DeepSpeed configs (`tcd_ds/ds_configs/`, package data; `ds_configs/` at the repo root links to it) and
the recipes (`tcd_ds/recipes/`). Every module asks here instead of computing the repo root.

A DeepSpeed config is named as the documentation does, `ds_configs/cpu_zero2.json`, or by a path of
the user's own (relative to the working directory, as ever): `ds_config` takes both.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
DS_CONFIGS = PACKAGE / "ds_configs"
RECIPES = PACKAGE / "recipes"
# the folder that holds the package: the repo root in a checkout or an editable install (where the
# benchmarks keep their cache and find ../shared/data), site-packages in a wheel install
ROOT = PACKAGE.parent


def ds_config(name: str) -> str:
    """The DeepSpeed config `name` stands for: the path itself where it is a file (relative to the
    working directory); else the shipped file it names (`ds_configs/cpu_zero2.json`, `cpu_zero2.json`,
    `cpu_zero2`); else `name` unchanged, for the caller to report as missing."""
    given = Path(name)
    if given.is_file():
        return name
    if given.parent in (Path("."), Path("ds_configs")):
        shipped = DS_CONFIGS / (given.name if given.suffix == ".json" else f"{given.name}.json")
        if shipped.is_file():
            return str(shipped)
    return name


def recipes(kind: str = "") -> Path:
    """The folder of a kind of recipe: `` (model recipes), `experiments`, `premise`, `replication`."""
    return RECIPES / kind if kind else RECIPES
