"""GLUE: task registry, TSV readers, hub loader and metrics.

Files are read in the layout ``download_glue_data.py`` writes (``glue_data/<TASK>/<split>.tsv``).

Reading rules
-------------
* UTF-8 with the BOM stripped (MRPC files start with one); lines split on ``\\n`` only (a trailing
  ``\\r`` is dropped), fields split on ``\\t`` only, no quoting (texts hold unbalanced ``"``), texts
  kept verbatim (SST-2 sentences keep their trailing space). A missing final newline is fine.
* Columns are found by their official names in the header line; CoLA train/dev have no header and
  use the fixed layout ``source, label, original-annotation, sentence``.
* Every row must have as many fields as the header. Rows with *more* fields (stray tabs inside a
  text) are accepted only where the official processors take the label from the last column
  (STS-B, MNLI, QNLI, RTE, WNLI): texts are then taken by index from the left, the label from the
  right, exactly as ``transformers``' GLUE processors do. Anywhere else a wrong field count is a
  :class:`GlueDataError` naming file and line.
* QQP: rows with *too few* fields are skipped (and counted in a log message), as the official QQP
  processor does (it skips rows that raise ``IndexError``); every other task raises.
* Labels are indices into ``TaskSpec.labels``, which is ordered like the ``datasets`` hub
  ``ClassLabel`` (so file and hub examples agree); STS-B labels are float scores; test labels None.

Metrics are plain numpy and return fractions (not percent). Degenerate cases: MCC is 0.0 when
either side is constant (as sklearn); Pearson/Spearman are 0.0 when either side is constant (no
linear/rank association can be measured; scipy would return nan) and nan if an input is not finite.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "GLUE_TASKS", "TASKS", "Example", "GlueDataError", "SplitSpec", "TaskSpec",
    "accuracy", "compute_metrics", "f1_binary", "get_task", "glue_average", "glue_score",
    "load_hub", "matthews_corrcoef", "pearson", "read_split", "spearman",
]


class GlueDataError(ValueError):
    """Missing or malformed GLUE data; the message is a single line naming the file (and line)."""


@dataclass(frozen=True)
class SplitSpec:
    file: str  # file name inside the task directory
    columns: tuple[str, ...]  # the official header (CoLA train/dev: the fixed layout, no header)
    header: bool = True


@dataclass(frozen=True, eq=False)  # identity hash: `splits` is a dict
class TaskSpec:
    name: str  # as GLUE spells it
    directory: str  # folder name under glue_data/
    hub_config: str  # `datasets` config of nyu-mll/glue
    text_a: str  # column names as in SplitSpec.columns
    text_b: str | None
    label: str | None
    labels: tuple[str, ...] | None  # raw label strings in file; index = hub ClassLabel id; None: regression
    splits: Mapping[str, SplitSpec]
    metrics: tuple[str, ...]  # keys compute_metrics returns
    main_metric: str
    hub_text: tuple[str, str | None]  # text column names in the hub dataset
    skip_short_rows: bool = False  # QQP only (see module docstring)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


@dataclass(frozen=True)
class Example:
    guid: str  # "<split>-<i>", i = 0-based data row (file) or hub idx
    text_a: str
    text_b: str | None
    label: int | float | None  # class index, STS-B score, None for test
    line: int | None = None  # 1-based line in the TSV file (None from the hub)


def _pair(first: str, second: str, label: str) -> tuple[str, ...]:
    return ("index", first, second, label)


_MNLI_PREFIX = ("index", "promptID", "pairID", "genre", "sentence1_binary_parse",
                "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1", "sentence2")
_MNLI_TRAIN = (*_MNLI_PREFIX, "label1", "gold_label")
_MNLI_DEV = (*_MNLI_PREFIX, "label1", "label2", "label3", "label4", "label5", "gold_label")
_STSB = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2")
_MRPC = ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
_NLI_LABELS = ("entailment", "not_entailment")


def _std(train: tuple[str, ...], test: tuple[str, ...]) -> dict[str, SplitSpec]:
    return {"train": SplitSpec("train.tsv", train), "dev": SplitSpec("dev.tsv", train),
            "test": SplitSpec("test.tsv", test)}


_COLA = ("source", "label", "original_annotation", "sentence")

TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("CoLA", "CoLA", "cola", "sentence", None, "label", ("0", "1"),
             {"train": SplitSpec("train.tsv", _COLA, header=False),
              "dev": SplitSpec("dev.tsv", _COLA, header=False),
              "test": SplitSpec("test.tsv", ("index", "sentence"))},
             ("mcc",), "mcc", ("sentence", None)),
    TaskSpec("SST-2", "SST-2", "sst2", "sentence", None, "label", ("0", "1"),
             _std(("sentence", "label"), ("index", "sentence")),
             ("accuracy",), "accuracy", ("sentence", None)),
    TaskSpec("MRPC", "MRPC", "mrpc", "#1 String", "#2 String", "Quality", ("0", "1"),
             _std(_MRPC, ("index", *_MRPC[1:])),
             ("f1", "accuracy"), "f1", ("sentence1", "sentence2")),
    TaskSpec("STS-B", "STS-B", "stsb", "sentence1", "sentence2", "score", None,
             _std((*_STSB, "score"), _STSB),
             ("pearson", "spearman"), "pearson", ("sentence1", "sentence2")),
    TaskSpec("QQP", "QQP", "qqp", "question1", "question2", "is_duplicate", ("0", "1"),
             _std(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
                  ("id", "question1", "question2")),
             ("f1", "accuracy"), "f1", ("question1", "question2"), skip_short_rows=True),
    TaskSpec("MNLI", "MNLI", "mnli", "sentence1", "sentence2", "gold_label",
             ("entailment", "neutral", "contradiction"),
             {"train": SplitSpec("train.tsv", _MNLI_TRAIN),
              "dev_matched": SplitSpec("dev_matched.tsv", _MNLI_DEV),
              "dev_mismatched": SplitSpec("dev_mismatched.tsv", _MNLI_DEV),
              "test_matched": SplitSpec("test_matched.tsv", _MNLI_PREFIX),
              "test_mismatched": SplitSpec("test_mismatched.tsv", _MNLI_PREFIX)},
             ("accuracy",), "accuracy", ("premise", "hypothesis")),
    TaskSpec("QNLI", "QNLI", "qnli", "question", "sentence", "label", _NLI_LABELS,
             _std(_pair("question", "sentence", "label"), ("index", "question", "sentence")),
             ("accuracy",), "accuracy", ("question", "sentence")),
    TaskSpec("RTE", "RTE", "rte", "sentence1", "sentence2", "label", _NLI_LABELS,
             _std(_pair("sentence1", "sentence2", "label"), ("index", "sentence1", "sentence2")),
             ("accuracy",), "accuracy", ("sentence1", "sentence2")),
    TaskSpec("WNLI", "WNLI", "wnli", "sentence1", "sentence2", "label", ("0", "1"),
             _std(_pair("sentence1", "sentence2", "label"), ("index", "sentence1", "sentence2")),
             ("accuracy",), "accuracy", ("sentence1", "sentence2")),
    # The diagnostic set (AX): test only, MNLI labels, not part of the GLUE average.
    TaskSpec("AX", "diagnostic", "ax", "sentence1", "sentence2", None,
             ("entailment", "neutral", "contradiction"),
             {"test": SplitSpec("diagnostic.tsv", ("index", "sentence1", "sentence2"))},
             ("mcc",), "mcc", ("premise", "hypothesis")),
]}
GLUE_TASKS: tuple[str, ...] = ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI")


def _norm(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


_ALIASES: dict[str, str] = {_norm(t.name): t.name for t in TASKS.values()}
_ALIASES.update({_norm(t.hub_config): t.name for t in TASKS.values()})
_ALIASES["diagnostic"] = "AX"


def get_task(task: str | TaskSpec) -> TaskSpec:
    """Case-insensitive lookup; hyphens/underscores optional ("sst-2", "SST2", "stsb", "ax")."""
    if isinstance(task, TaskSpec):
        return task
    name = _ALIASES.get(_norm(task))
    if name is None:
        raise GlueDataError(f"unknown GLUE task {task!r} (known: {', '.join(TASKS)})")
    return TASKS[name]


def _split_spec(spec: TaskSpec, split: str) -> tuple[str, SplitSpec]:
    key = split.lower().replace("validation", "dev")  # accept hub split names too
    if key not in spec.splits:
        raise GlueDataError(f"{spec.name} has no split {split!r} (splits: {', '.join(spec.splits)})")
    return key, spec.splits[key]


# ---------------------------------------------------------------------------------------------
# TSV reader


def _task_dir(glue_dir: Path, spec: TaskSpec) -> Path:
    if not glue_dir.is_dir():
        raise GlueDataError(f"GLUE directory not found: {glue_dir}")
    if _norm(glue_dir.name) in (_norm(spec.directory), _norm(spec.name)):
        return glue_dir  # the task folder itself
    subdirs = sorted(p for p in glue_dir.iterdir() if p.is_dir())
    for p in subdirs:
        if _norm(p.name) in (_norm(spec.directory), _norm(spec.name)):
            return p
    raise GlueDataError(f"task directory not found: {glue_dir / spec.directory} "
                        f"(present in {glue_dir}: {', '.join(p.name for p in subdirs) or 'nothing'})")


def _short(s: str) -> str:
    return repr(s if len(s) <= 40 else s[:40] + "...")


def _read_lines(path: Path) -> list[str]:
    """The file's lines (BOM, the final newline and CRs dropped); a missing file says what is there."""
    if not path.is_file():
        present = sorted(p.name for p in path.parent.iterdir() if p.is_file())
        raise GlueDataError(f"GLUE file not found: {path} (present in {path.parent}: "
                            f"{', '.join(present) or 'nothing'})")
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _label(raw: str, spec: TaskSpec, fail) -> int | float:
    """A label field: the class index, or the (finite) score of a regression task; `fail(what)`
    builds the error naming the line."""
    if spec.labels is None:
        try:
            score = float(raw)
        except ValueError:
            raise fail(f"non-numeric score {_short(raw)}") from None
        if not math.isfinite(score):
            raise fail(f"non-finite score {_short(raw)}")
        return score
    if raw in spec.labels:
        return spec.labels.index(raw)
    raise fail(f"unknown label {_short(raw)} (expected one of {', '.join(spec.labels)})")


def read_split(glue_dir: str | Path, task: str | TaskSpec, split: str) -> list[Example]:
    """Read one split of a GLUE task from ``glue_dir`` (``glue_data/`` or ``glue_data/<TASK>/``)."""
    spec = get_task(task)
    split, sspec = _split_spec(spec, split)
    path = _task_dir(Path(glue_dir), spec) / sspec.file
    lines = _read_lines(path)

    def fail(lineno: int, what: str) -> GlueDataError:
        return GlueDataError(f"{path}:{lineno}: {what}")

    columns = sspec.columns
    first = 0
    if sspec.header:
        if not lines:
            raise fail(1, "empty file, expected a header line")
        columns = tuple(lines[0].split("\t"))
        first = 1

    def col(name: str) -> int:
        if name not in columns:
            raise fail(1, f"header has no column {name!r} (header: {', '.join(columns)})")
        return columns.index(name)

    is_test = split.startswith("test")
    ia, ib = col(spec.text_a), (None if spec.text_b is None else col(spec.text_b))
    il = None if (is_test or spec.label is None) else col(spec.label)
    label_last = il is not None and il == len(columns) - 1
    if label_last:
        il = -1  # from the right, as the official processors (line[-1])
    n_fields = len(columns)

    examples: list[Example] = []
    skipped = 0
    for offset, text in enumerate(lines[first:]):
        lineno = first + offset + 1
        fields = text.split("\t")
        extra_ok = label_last and len(fields) > n_fields  # stray tabs in a text: label from the right
        if len(fields) != n_fields and not extra_ok:
            if len(fields) < n_fields and spec.skip_short_rows:
                skipped += 1
                continue
            raise fail(lineno, f"expected {n_fields} tab-separated fields, got {len(fields)}")
        label = None if il is None else _label(fields[il].strip(), spec, lambda what: fail(lineno, what))
        examples.append(Example(f"{split}-{len(examples)}", fields[ia],
                                None if ib is None else fields[ib], label, lineno))
    if skipped:
        log.warning("%s: skipped %d rows with missing fields (as the official QQP processor)", path, skipped)
    return examples


# ---------------------------------------------------------------------------------------------
# datasets hub


def load_hub(task: str | TaskSpec, split: str, hub_id: str = "nyu-mll/glue") -> list[Example]:
    """The same Examples from the ``datasets`` hub (``nyu-mll/glue``, which ``glue`` redirects to).

    Split names are the file ones (``dev``, ``dev_matched``...) or the hub ones (``validation``...).
    Any failure to load (offline, unknown config...) raises a one-line :class:`GlueDataError`.
    """
    spec = get_task(task)
    split, _ = _split_spec(spec, split)
    hub_split = split.replace("dev", "validation")
    try:
        from datasets import load_dataset

        ds = load_dataset(hub_id, spec.hub_config, split=hub_split)
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one clear line
        msg = " ".join(str(e).split())[:300]
        raise GlueDataError(f"could not load {hub_id}/{spec.hub_config} split {hub_split!r} from the "
                            f"Hugging Face hub ({type(e).__name__}: {msg})") from e
    ka, kb = spec.hub_text
    out: list[Example] = []
    for i, row in enumerate(ds):
        raw = row.get("label")
        if spec.is_regression:
            label: int | float | None = None if raw is None or split.startswith("test") else float(raw)
        else:
            label = None if raw is None or int(raw) < 0 else int(raw)  # hub test labels are -1
        out.append(Example(f"{split}-{row.get('idx', i)}", row[ka], None if kb is None else row[kb], label))
    return out


# ---------------------------------------------------------------------------------------------
# metrics (numpy only)


def _pair_arrays(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"length mismatch: {t.size} labels vs {p.size} predictions")
    if t.size == 0:
        raise ValueError("empty inputs")
    return t, p


def accuracy(y_true: Any, y_pred: Any) -> float:
    t, p = _pair_arrays(y_true, y_pred)
    return float(np.mean(t == p))


def f1_binary(y_true: Any, y_pred: Any, positive: int = 1) -> float:
    """F1 of the positive class; 0.0 when there are no true or predicted positives."""
    t, p = _pair_arrays(y_true, y_pred)
    tp = np.sum((t == positive) & (p == positive))
    fp = np.sum((t != positive) & (p == positive))
    fn = np.sum((t == positive) & (p != positive))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def matthews_corrcoef(y_true: Any, y_pred: Any) -> float:
    """Matthews correlation (multi-class form, as sklearn); 0.0 when either side is constant."""
    t, p = _pair_arrays(y_true, y_pred)
    _, inv = np.unique(np.concatenate([t, p]), return_inverse=True)
    k = int(inv.max()) + 1
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (inv[: t.size], inv[t.size:]), 1)
    n, correct = cm.sum(), np.trace(cm)
    t_sum, p_sum = cm.sum(axis=1), cm.sum(axis=0)
    cov_tp = correct * n - t_sum @ p_sum
    cov_tt = n * n - t_sum @ t_sum
    cov_pp = n * n - p_sum @ p_sum
    if cov_tt == 0 or cov_pp == 0:
        return 0.0
    return float(cov_tp / math.sqrt(cov_tt * cov_pp))


def pearson(x: Any, y: Any) -> float:
    """Pearson r; 0.0 if either side is constant, nan if any value is not finite."""
    a, b = _pair_arrays(x, y)
    a, b = a.astype(np.float64), b.astype(np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    if denom == 0.0:
        return 0.0
    return float(np.clip((a @ b) / denom, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the mean of the ranks they span."""
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of the last element of each group of equal values
    return (ends - (counts - 1) / 2.0)[inv]


def spearman(x: Any, y: Any) -> float:
    """Spearman rho = Pearson on average ranks (ties handled as scipy); same degenerate rules."""
    a, b = _pair_arrays(x, y)
    a, b = a.astype(np.float64), b.astype(np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    return pearson(_average_ranks(a), _average_ranks(b))


def compute_metrics(task: str | TaskSpec, predictions: Any, labels: Any) -> dict[str, float]:
    """The task's GLUE metrics as fractions. Classification predictions may be class ids or logits
    of shape (n, num_labels) (argmax taken); STS-B predictions are scores of shape (n,) or (n, 1).
    MNLI: call once per matched / mismatched dev split."""
    spec = get_task(task)
    preds = np.asarray(predictions)
    if spec.is_regression:
        preds = preds.reshape(-1).astype(np.float64)
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        return {"pearson": pearson(preds, y), "spearman": spearman(preds, y)}
    if preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    y = np.asarray(labels)
    fns = {"mcc": matthews_corrcoef, "accuracy": accuracy, "f1": f1_binary}
    return {m: fns[m](y, preds) for m in spec.metrics}


def glue_score(task: str | TaskSpec, metrics: Mapping[str, float]) -> float:
    """Per-task number used in the GLUE average: the mean of the task's metrics (MRPC/QQP: F1 and
    accuracy; STS-B: Pearson and Spearman). MNLI: the mean of ``accuracy_m`` and ``accuracy_mm``
    when both are given (as the GLUE leaderboard), else ``accuracy``."""
    spec = get_task(task)
    if spec.name == "MNLI" and "accuracy_m" in metrics and "accuracy_mm" in metrics:
        keys: Sequence[str] = ("accuracy_m", "accuracy_mm")
    else:
        keys = spec.metrics
    missing = [k for k in keys if k not in metrics]
    if missing:
        raise ValueError(f"{spec.name}: metrics missing {', '.join(missing)} (got {', '.join(metrics) or 'none'})")
    return float(np.mean([float(metrics[k]) for k in keys]))


def glue_average(scores: Mapping[str, float], include_wnli: bool = True) -> float:
    """Mean of per-task scores (from :func:`glue_score`) over the tasks given.

    The GLUE leaderboard averages all nine tasks, WNLI included (``include_wnli=True``); the BERT
    paper left WNLI out of its averages (``include_wnli=False`` drops it if present). Task names
    are case-insensitive; AX (diagnostic) is not a GLUE-score task and is rejected.
    """
    by_name: dict[str, float] = {}
    for key, value in scores.items():
        name = get_task(key).name
        if name not in GLUE_TASKS:
            raise ValueError(f"{name} is not part of the GLUE average")
        if name in by_name:
            raise ValueError(f"task {name} given twice")
        by_name[name] = float(value)
    if not include_wnli:
        by_name.pop("WNLI", None)
    if not by_name:
        raise ValueError("no task scores to average")
    return float(np.mean(list(by_name.values())))
