"""The experiment recipe (`python -m tcd_ds.experiments <recipe> [key=value ...]`) as typed sections of
`tcd_ds.config`'s one mechanism: the same coercion, unknown-key suggestions and `key=value` overrides
as the trainer's config; each section validates its own values. `pretrain` and `teacher` are free
mappings of trainer keys, checked by building the trainer's config from them (`experiments.validate`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tcd_ds.config import ConfigError, Section


@dataclass
class AlignConfig(Section):
    """The performance-aligned baseline: a longer baseline (`factor` x steps) when the baseline's own
    checkpoints do not reach the student's val MLM loss, evaluated and saved every `every` steps."""

    factor: float = 2.0
    every: int = 100

    def validate(self) -> None:
        if self.factor < 1 or self.every < 1:
            raise ConfigError("align.factor must be >= 1 and align.every >= 1")


@dataclass
class AblationsConfig(Section):
    """TCD with position subsets (T, I, A, TI, ...), fine-tuned on `tasks`."""

    positions: list[str] = field(default_factory=lambda: ["T", "I", "A", "TI", "TA", "IA"])
    tasks: list[str] = field(default_factory=lambda: ["MRPC"])

    def validate(self) -> None:
        positions = []
        for p in self.positions:
            canon = "".join(c for c in "TIA" if c in p.upper())
            if not p or len(canon) != len(p) or canon in positions:
                raise ConfigError(f"ablations.positions: {p!r} is not a new non-empty subset of T, I, A")
            positions.append(canon)
        self.positions = positions
        self.tasks = _task_names("ablations.tasks", self.tasks)


@dataclass
class TrendConfig(Section):
    """`task` fine-tuned from checkpoints every `every` steps; empty `lrs` / `seeds`: glue's."""

    task: str = "MRPC"
    every: int = 100
    lrs: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    def validate(self) -> None:
        self.task = _task_names("trend.task", [self.task])[0]
        _check_lrs("trend.lrs", self.lrs)
        if min(self.seeds, default=0) < 0:
            raise ConfigError(f"trend.seeds must be >= 0, got {min(self.seeds)}")


@dataclass
class AnalyzeConfig(Section):
    sequences: int = 128  # held-out sequences per eval corpus

    def validate(self) -> None:
        if self.sequences < 1:
            raise ConfigError(f"analyze.sequences must be >= 1, got {self.sequences}")


@dataclass
class GlueTaskConfig(Section):
    """One task's own fine-tuning settings; None: glue's."""

    lrs: list[float] | None = None
    epochs: int | None = None
    batch_size: int | None = None


def parse_per_task(text: str) -> dict[str, dict[str, Any]]:
    """`glue.per_task` on the command line: `"SST-2:lrs=3e-4,1e-4,epochs=1,batch_size=128;CoLA:epochs=5"`
    (a bare number continues the previous list) -> `{task: {key: value}}`, typed by `GlueTaskConfig`."""
    parsed: dict[str, dict[str, Any]] = {}
    for item in filter(None, (x.strip() for x in text.split(";"))):
        task, sep, rest = item.partition(":")
        if not sep:
            raise ConfigError(f"glue.per_task entry {item!r} is not TASK:key=value[,...]")
        entry = parsed.setdefault(task.strip(), {})
        for kv in filter(None, (x.strip() for x in rest.split(","))):
            k, eq, v = kv.partition("=")
            if not eq:
                if not entry or not isinstance(entry.get(last := list(entry)[-1]), list):
                    raise ConfigError(f"glue.per_task entry {item!r}: {kv!r} is not key=value")
                entry[last].append(k.strip())
                continue
            entry[k.strip()] = [v.strip()] if k.strip() == "lrs" else v.strip()
    return parsed


@dataclass
class GlueConfig(Section):
    """Step glue's fine-tuning grid: every model x `tasks` x `lrs` x `seeds`."""

    dir: str = "../shared/data/glue"
    tasks: list[str] = field(default_factory=lambda: ["CoLA", "SST-2", "MRPC", "WNLI", "QNLI"])
    lrs: list[float] = field(default_factory=lambda: [1e-4])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    epochs: int = 2
    max_train_examples: int = 0
    max_eval_examples: int = 0
    batch_size: int = 32
    max_seq_len: int = 128
    include_aligned: bool = True
    threads: int = 0  # OMP_NUM_THREADS of each fine-tuning process (0: the experiment's `threads`)
    include_random: bool = True
    # per-task lrs / epochs / batch_size overriding glue's, e.g. {SST-2: {lrs: [3e-4], epochs: 1}}
    per_task: dict[str, GlueTaskConfig] = field(default_factory=dict, metadata={"parse": parse_per_task})

    def validate(self) -> None:
        self.tasks = _task_names("glue.tasks", self.tasks)
        per_task = {}
        for task, settings in self.per_task.items():
            name = _task_names("glue.per_task", [task])[0]
            if name in per_task:
                raise ConfigError(f"glue.per_task names {name} twice")
            if settings.lrs == [] or any(not lr > 0 for lr in settings.lrs or []) or \
                    any(n is not None and n < 1 for n in (settings.epochs, settings.batch_size)):
                raise ConfigError(f"glue.per_task.{task}: lrs must be a non-empty list of values > 0, "
                                  "epochs and batch_size >= 1")
            per_task[name] = settings
        self.per_task = per_task
        if not self.tasks or not self.lrs or not self.seeds:
            raise ConfigError("glue.tasks, glue.lrs and glue.seeds must not be empty")
        _check_lrs("glue.lrs", self.lrs)
        for key in ("epochs", "batch_size", "max_seq_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"glue.{key} must be >= 1, got {getattr(self, key)}")
        if min(self.max_train_examples, self.max_eval_examples, *self.seeds) < 0:
            raise ConfigError("glue.max_*_examples and seeds must be >= 0")


@dataclass
class ExperimentConfig(Section):
    """The root of an experiment recipe (`tcd_ds/recipes/experiments/*.yaml`)."""

    KEY_NOUN = "recipe key"  # in messages: "unknown recipe key 'glue.sedes'; did you mean 'glue.seeds'?"

    model_recipe: str = "tiny"  # tcd_ds/recipes/<name>.yaml or a path, for every pre-training run
    ranks: int = 1  # 1: python -m tcd_ds.train; >1: the deepspeed launcher
    ds_config: str = "ds_configs/cpu_zero2.json"  # or auto (experiments.resolve_ds_config)
    threads: int = 1  # OMP_NUM_THREADS of every trainer rank and fine-tuning process (0: leave it)
    jobs: int = 1  # fine-tuning processes at a time
    # step pretrain's runs (the MoE baseline and the TCD student) at a time; side by side, each
    # gets max(1, threads // pretrain_jobs) threads (small MoE models use 2 cores better as 2 x 1)
    pretrain_jobs: int = 1
    out: str = ""  # default runs/experiments/<recipe name>
    pretrain: dict[str, Any] = field(default_factory=dict)  # trainer keys of every pre-training run
    teacher: dict[str, Any] = field(default_factory=dict)  # extra trainer keys for the teacher only
    # another experiment's out dir whose finished teacher (run and GLUE sweeps) step teacher copies
    # instead of training one: a replicate with another pretrain.seed keeps the same teacher
    teacher_from: str = ""
    align: AlignConfig = field(default_factory=AlignConfig)
    ablations: AblationsConfig = field(default_factory=AblationsConfig)
    trend: TrendConfig = field(default_factory=TrendConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    glue: GlueConfig = field(default_factory=GlueConfig)

    def validate(self) -> "ExperimentConfig":
        if self.ranks < 1 or self.jobs < 1 or self.threads < 0 or self.glue.threads < 0:
            raise ConfigError("ranks and jobs must be >= 1, threads and glue.threads >= 0")
        if self.pretrain_jobs not in (1, 2):
            raise ConfigError(f"pretrain_jobs must be 1 or 2 (step pretrain trains two runs), got {self.pretrain_jobs}")
        for section in (self.analyze, self.align, self.ablations, self.trend, self.glue):
            section.validate()
        return self

    def as_dict(self) -> dict[str, Any]:
        """The plain nested dict the pipeline and the report read (`rc`); a per-task setting left to
        glue's is absent from its entry."""
        rc = dataclasses.asdict(self)
        rc["glue"]["per_task"] = {task: {k: v for k, v in entry.items() if v is not None}
                                  for task, entry in rc["glue"]["per_task"].items()}
        return rc


def _task_names(key: str, tasks: list[str]) -> list[str]:
    """The canonical GLUE names of `tasks` (`mrpc` -> `MRPC`), each once."""
    from tcd_ds.data.glue import GlueDataError, get_task

    try:
        names = [get_task(x).name for x in tasks]
    except GlueDataError as err:
        raise ConfigError(str(err)) from None
    if len(set(names)) != len(names):
        raise ConfigError(f"{key} names a task twice")
    return names


def _check_lrs(key: str, lrs: list[float]) -> None:
    for lr in lrs:
        if not lr > 0:
            raise ConfigError(f"learning rates must be > 0, got {lr}")
