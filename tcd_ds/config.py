"""One typed config tree for tcd-ds: plain dataclasses, recipes by name, `key=value` overrides.

Every section validates its own values; `Config.validate()` checks what spans sections. Errors are
`ConfigError` with one line that names the bad key (and the nearest valid one for a typo).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any

from tcd_ds import resources
from tcd_ds.distill import forms as relation_forms
from tcd_ds.model.experts import registry as moe_backends

RECIPES_DIR = resources.RECIPES


class ConfigError(ValueError):
    """A bad configuration value: the message is one line meant for the user."""


class Section:
    """Base of the config dataclasses: `freeze(tree)` makes a tree read-only (the resolved config of
    a run, see `tcd_ds.train.resolve_run`: every builder reads it, none may change it)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"{type(self).__name__}.{name}: the resolved run config is read-only "
                                 "(change it through the recipe or a key=value override)")
        object.__setattr__(self, name, value)


def freeze(cfg: Any) -> Any:
    """Make the dataclass tree `cfg` read-only, in place; returns it."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            freeze(value)
    object.__setattr__(cfg, "_frozen", True)
    return cfg


@dataclass
class MoEConfig(Section):
    """Mixture-of-experts FFN. `num_experts == 0` means a dense (vanilla) FFN everywhere."""

    num_experts: int = 0
    top_k: int = 1
    moe_every: int = 1  # 1: every layer is MoE; 2: layers 1, 3, 5, ... (0-based odd) are MoE
    capacity_factor: float = 0.0  # 0: dropless; > 0: capacity = ceil(cf * tokens * top_k / experts)
    eval_capacity_factor: float = 0.0  # used in eval mode; 0: dropless
    min_capacity: int = 4  # lower bound of the per-expert capacity when capacity_factor > 0
    aux_loss_weight: float = 0.01  # Switch load-balancing loss weight
    z_loss_weight: float = 0.0  # router z-loss weight (ST-MoE); 0 disables it
    jitter: float = 0.0  # multiplicative router-input noise U(1-j, 1+j) in training (Switch)
    normalize_top_k: bool = True  # renormalise the k gate values to sum to 1 (top_k > 1)
    backend: str = "torch"  # a name of tcd_ds/model/experts/registry.py: torch | grouped | deepspeed | megablocks
    ep_size: int = 1  # expert-parallel world size (deepspeed backend)

    def validate(self) -> None:
        if self.num_experts < 0:
            raise ConfigError(f"model.moe.num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts == 0:
            return
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"model.moe.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.moe_every < 1:
            raise ConfigError(f"model.moe.moe_every must be >= 1, got {self.moe_every}")
        if self.capacity_factor < 0 or self.eval_capacity_factor < 0:
            raise ConfigError("model.moe.capacity_factor and eval_capacity_factor must be >= 0 (0 = dropless)")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"model.moe.jitter must be in [0, 1), got {self.jitter}")
        backends = moe_backends.names()
        if self.backend not in backends:
            raise ConfigError(f"model.moe.backend must be one of {', '.join(backends)}, got {self.backend!r}")
        if self.ep_size < 1 or self.num_experts % self.ep_size:
            raise ConfigError(
                f"model.moe.ep_size={self.ep_size} must divide model.moe.num_experts={self.num_experts}")
        if self.ep_size > 1 and not moe_backends.get(self.backend).expert_parallel:
            raise ConfigError(f"model.moe.ep_size={self.ep_size} needs model.moe.backend="
                              f"{' or '.join(moe_backends.expert_parallel())} "
                              f"(backend {self.backend!r} keeps all experts on every rank)")


@dataclass
class ModelConfig(Section):
    """A BERT encoder; the names follow Hugging Face `BertConfig` where they map one to one."""

    vocab_size: int = 30522
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    # position embeddings' init (they stay learned, absolute, BERT's): normal(0, initializer_range), or a
    # sinusoid table (Vaswani et al.) scaled to the same std, which gives attention a relative-position
    # structure from step 0 (see docs/results/small/report.md for what it buys)
    position_init: str = "normal"
    # "post": BERT's post-LN layer (the paper's); "pre": pre-LN (the sublayer's input normalised, the
    # residual stream left alone, one final LayerNorm), a documented deviation for short budgets
    layer_norm: str = "post"
    # "absolute": BERT's learned position embeddings; "rotary": RoFormer's rotary positions on Q and K
    # (no position embeddings), a documented deviation: at hidden 128 on a CPU budget the absolute
    # model stays on the bag-of-words plateau (docs/results/small/tuning.md)
    position_encoding: str = "absolute"
    pad_token_id: int = 0
    activation_checkpointing: bool = False  # non-reentrant, per layer
    moe: MoEConfig = field(default_factory=MoEConfig)

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.position_init not in ("normal", "sinusoidal"):
            raise ConfigError(f"model.position_init must be normal or sinusoidal, got {self.position_init!r}")
        if self.position_encoding not in ("absolute", "rotary"):
            raise ConfigError(f"model.position_encoding must be absolute or rotary, got {self.position_encoding!r}")
        if self.layer_norm not in ("post", "pre"):
            raise ConfigError(f"model.layer_norm must be post or pre, got {self.layer_norm!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        if self.position_encoding == "rotary" and (self.head_dim % 2 or self.position_init != "normal"):
            raise ConfigError("model.position_encoding=rotary needs an even head dimension (hidden_size / "
                              "num_heads) and model.position_init=normal (there are no position embeddings)")
        self.moe.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer `index` (0-based) has an MoE FFN: with moe_every=k, layers k-1, 2k-1, ..."""
        return self.moe.num_experts > 0 and (index + 1) % self.moe.moe_every == 0


@dataclass
class DistillConfig(Section):
    """Relation alignment (TCD): which positions, their weights and the loss form."""

    positions: str = "TIA"  # any subset of T (trunk), I (residual inner), A (attention Q/K/V)
    weight_t: float = 1.0
    weight_i: float = 1.0
    weight_a: float = 1.0
    form: str = "mse"  # a name of tcd_ds/distill/forms.py: mse | kl
    tau: float = 1.0  # KL temperature
    impl: str = "auto"  # auto | naive | gram (the MSE fast path)
    include_embeddings: bool = True  # T also aligns the embedding output (layer 0)
    # A's relation heads: 0 = per attention head (teacher and student need the same num_heads); n > 0 =
    # MiniLMv2's relation heads: each of Q, K, V (heads concatenated) is split into n heads of
    # hidden_size / n, so teacher and student may differ in heads (n must divide both hidden sizes)
    relation_heads: int = 0

    def validate(self) -> None:
        if self.relation_heads < 0:
            raise ConfigError(f"distill.relation_heads must be >= 0 (0 = per attention head), got {self.relation_heads}")
        bad = set(self.positions) - set("TIA")
        if bad or not self.positions:
            raise ConfigError(f"distill.positions must be a non-empty subset of 'TIA', got {self.positions!r}")
        if self.form not in relation_forms.names():
            raise ConfigError(f"distill.form must be {' or '.join(map(repr, relation_forms.names()))}, got {self.form!r}")
        if self.impl not in relation_forms.IMPLS:
            raise ConfigError(f"distill.impl must be auto, naive or gram, got {self.impl!r}")
        if self.impl != "auto" and self.impl not in relation_forms.get(self.form).impls:
            raise ConfigError(f"distill.impl={self.impl} is only implemented for distill.form="
                              f"{' or '.join(relation_forms.with_impl(self.impl))}; use impl=auto or naive with "
                              f"form={self.form}")
        if self.tau <= 0:
            raise ConfigError(f"distill.tau must be > 0, got {self.tau}")

    def weight(self, position: str) -> float:
        return {"T": self.weight_t, "I": self.weight_i, "A": self.weight_a}[position]


@dataclass
class TeacherConfig(Section):
    """The frozen vanilla teacher: a Hugging Face BERT dir or a tcd-ds export dir."""

    path: str = ""
    dtype: str = "auto"  # auto (fp16 on GPU; on CPU bf16 where native, else fp32) | fp16 | bf16 | fp32

    def validate(self) -> None:
        if self.dtype not in ("auto", "fp16", "bf16", "fp32"):
            raise ConfigError(f"teacher.dtype must be auto, fp16, bf16 or fp32, got {self.dtype!r}")


_TRAINED_VOCAB = re.compile(r"wordpiece:(\d+)")  # data.vocab=wordpiece:N: a vocab trained on the corpus
MIN_TRAINED_VOCAB = 256  # the alphabet and the ## pieces alone take a few hundred ids


def trained_vocab_size(vocab: str) -> int | None:
    """``N`` for ``vocab == "wordpiece:N"`` (train a vocab of at most N tokens on the corpus, see
    ``tcd_ds/data/fallback.py``), else None."""
    m = _TRAINED_VOCAB.fullmatch(str(vocab).strip())
    return int(m.group(1)) if m else None


@dataclass
class DataConfig(Section):
    """Pre-training corpus, tokenizer, packing and the held-out evaluation sets."""

    corpus: str = "../shared/data/wikipedia-en-2015"  # WikiExtractor dir, text files, or a hub name
    vocab: str = "../shared/data/vocab/bert-base-uncased-vocab.txt"  # vocab.txt, a hub tokenizer name, or wordpiece:N
    max_seq_len: int = 128
    max_documents: int = 0  # 0: the whole corpus
    val_fraction: float = 0.01  # held out from the corpus, by sequence index
    mlm_probability: float = 0.15
    # masking of every held-out evaluation: fixed, so runs trained with other masking rates compare
    eval_mlm_probability: float = 0.15
    # the held-out masks' seed: a constant, not `seed`, so runs with other seeds (and any world size or
    # micro-batch) evaluate the same masked tokens; sequence j of an eval set is masked by
    # mlm_generator(eval_seed, j) alone
    eval_seed: int = 1
    cache_dir: str = ".cache/tcd_ds"  # pre-tokenised shards, keyed by a hash of inputs + tokenizer
    # name=path pairs, comma-separated: held-out text from elsewhere and an out-of-distribution domain
    eval_corpora: str = ("wikitext2=../shared/data/wikitext-2/wiki.test.raw,"
                         "gutenberg=../shared/data/gutenberg-novels")
    eval_max_sequences: int = 256  # per eval corpus

    def validate(self) -> None:
        if self.max_seq_len < 8:
            raise ConfigError(f"data.max_seq_len must be >= 8, got {self.max_seq_len}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 < self.mlm_probability < 1:
            raise ConfigError(f"data.mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if not 0 < self.eval_mlm_probability < 1:
            raise ConfigError(f"data.eval_mlm_probability must be in (0, 1), got {self.eval_mlm_probability}")
        if self.vocab.startswith("wordpiece:"):
            size = trained_vocab_size(self.vocab)
            if size is None or size < MIN_TRAINED_VOCAB:
                raise ConfigError(f"data.vocab={self.vocab!r}: a trained vocab is wordpiece:N with N >= "
                                  f"{MIN_TRAINED_VOCAB} (e.g. wordpiece:8192)")

    def eval_sets(self) -> dict[str, str]:
        out = {}
        for item in filter(None, (x.strip() for x in self.eval_corpora.split(","))):
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"data.eval_corpora entry {item!r} is not name=path")
            out[name.strip()] = path.strip()
        return out


@dataclass
class TrainConfig(Section):
    """Optimisation, schedule and the run's cadence. Batch size, accumulation and clipping are
    written into the DeepSpeed config (whose JSON may say "auto" for them)."""

    max_steps: int = 1000
    micro_batch_size: int = 32  # per rank
    grad_accum: int = 1
    grad_clip: float = 1.0
    lr: float = 5e-4
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "linear"  # linear | cosine (after the linear warm-up)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    fused_optimizer: bool = True  # torch's fused AdamW kernel (CPU/CUDA); false: torch's default (single-tensor on CPU)
    log_every: int = 10
    eval_every: int = 200  # 0: only at the end
    eval_batches: int = 8  # per eval set
    save_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 3
    # > 0: the run ends, complete (final eval, export, summary), at the first periodic eval whose val MLM
    # loss is at or below this; the experiments' performance-aligned baseline needs nothing after it
    stop_at_val_loss: float = 0.0
    max_nonfinite_steps: int = 3  # skipped (non-finite loss or gradient) steps in a row before the run stops
    collective_timeout_s: float = 600.0  # a rank waiting longer on a dead peer fails instead of hanging

    def validate(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "eval_batches", "keep_checkpoints",
                     "max_nonfinite_steps", "collective_timeout_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in ("linear", "cosine"):
            raise ConfigError(f"train.schedule must be linear or cosine, got {self.schedule!r}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.eval_every < 0 or self.save_every < 0:
            raise ConfigError("train.lr must be > 0 and warmup_steps, eval_every, save_every >= 0")
        if self.stop_at_val_loss < 0 or (self.stop_at_val_loss > 0 and not self.eval_every):
            raise ConfigError(f"train.stop_at_val_loss must be >= 0 (0: off) and needs train.eval_every > 0, got "
                              f"{self.stop_at_val_loss} with eval_every {self.eval_every}")


@dataclass
class Config(Section):
    """The root of the tree."""

    mode: str = "tcd"  # vanilla | moe | tcd
    seed: int = 1234
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        if self.mode not in ("vanilla", "moe", "tcd"):
            raise ConfigError(f"mode must be vanilla, moe or tcd, got {self.mode!r}")
        self.model.validate()
        self.distill.validate()
        self.teacher.validate()
        self.data.validate()
        self.train.validate()
        if self.mode != "vanilla" and self.model.moe.num_experts == 0:
            raise ConfigError(f"mode={self.mode} needs an MoE model: set model.moe.num_experts > 0")
        if self.mode == "tcd" and not self.teacher.path:
            raise ConfigError("mode=tcd needs a teacher: set teacher.path=<a vanilla run dir or model dir>")
        if self.data.max_seq_len > self.model.max_position:
            raise ConfigError(f"data.max_seq_len={self.data.max_seq_len} exceeds model.max_position="
                              f"{self.model.max_position}")
        return self

    def student_model(self) -> ModelConfig:
        """The model this mode trains: vanilla mode drops the MoE FFNs."""
        if self.mode == "vanilla":
            return dataclasses.replace(self.model, moe=MoEConfig())
        return self.model


# --- building, overriding, loading ---------------------------------------------------------

def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def key_noun(root: type | None) -> str:
    """What the messages call a key of the tree `root`: "config key", or a tree's own `KEY_NOUN`
    (the experiment recipe's "recipe key")."""
    return getattr(root, "KEY_NOUN", "config key")


def _mapping_of(tp: Any) -> Any:
    """For a field typed `dict[str, X]`: X (`Any` for a free mapping); else None."""
    if typing.get_origin(tp) is dict:
        return typing.get_args(tp)[1] if typing.get_args(tp) else Any
    return None


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", root: type | None = None) -> Any:
    """Build dataclass `cls` from nested plain values; unknown keys fail with the nearest valid path
    of the tree `root` (default `cls`) that `prefix` is in.

    Field types: the scalars, `list[X]` (a list or a comma-separated string), `X | None`, nested
    dataclasses, `dict[str, Dataclass]` (e.g. per-task settings) and `dict[str, Any]` (a free
    mapping, checked by its owner: the experiment's trainer overrides). A field whose metadata has
    `parse` also takes one string in the form that function reads (`glue.per_task="SST-2:lrs=3e-4"`)."""
    root = root or cls
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or key_noun(root).split()[0]} must be a mapping, "
                          f"got {type(data).__name__}")
    types = _field_types(cls)
    parsers = {f.name: f.metadata["parse"] for f in dataclasses.fields(cls) if "parse" in f.metadata}
    kwargs = {}
    for key, value in data.items():
        if key not in types:
            raise ConfigError(_unknown_key(root, prefix + key, prefix, list(types), section=isinstance(value, dict)))
        tp, path = types[key], prefix + key
        if key in parsers and isinstance(value, str):
            value = parsers[key](value)
        item = _mapping_of(tp)
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, path + ".", root)
        elif item is not None:
            value = {} if value is None else value
            if not isinstance(value, dict):
                raise ConfigError(f"{key_noun(root)} '{path}' must be a mapping, got {value!r}")
            kwargs[key] = {str(k): from_dict(item, v, f"{path}.{k}.", root) if dataclasses.is_dataclass(item)
                           else copy.deepcopy(v) for k, v in value.items()}
        else:
            kwargs[key] = coerce(value, tp, path, key_noun(root))
    return cls(**kwargs)


def config_paths(cls: type | None = None, prefix: str = "") -> dict[str, bool]:
    """Every dotted path of the tree of `cls` (default `Config`), each mapped to whether it is a
    section: `{"mode": False, "model": True, "model.moe": True, "model.moe.ep_size": False, ...}`."""
    out: dict[str, bool] = {}
    for name, tp in _field_types(cls or Config).items():
        section = dataclasses.is_dataclass(tp) or _mapping_of(tp) is not None
        out[prefix + name] = section
        if dataclasses.is_dataclass(tp):
            out.update(config_paths(tp, prefix + name + "."))
    return out


def nearest_paths(path: str, candidates: list[str], prefix: str = "") -> list[str]:
    """The candidate full paths the user most likely meant by `path` (at most 3, best first), or []
    when none is close. `prefix` is the leading part of `path` that exists in the tree.

    In order: the candidates that end with `path` (`moe.ep_size` -> `model.moe.ep_size`); those with
    the same last key (`train.ep_size` -> `model.moe.ep_size`), the closest to `path` first; else the
    closest by `difflib` ratio (>= 0.6) of the unknown rest of `path` (from its first unknown key on)
    against a candidate's rest under `prefix`, or against the candidate's last as many keys
    (`trian.max_steps` -> `train.max_steps`, `moe.ep_sise` -> `model.moe.ep_size`, `train.jiter` ->
    `model.moe.jitter`); of tied ones, those in the section `prefix` names (else all)."""
    parts, rest = path.split("."), path[len(prefix):]
    depth = rest.count(".") + 1

    def ratio(a: str, b: str) -> float:
        return difflib.SequenceMatcher(None, a, b).ratio()

    for pool in ([c for c in candidates if c.endswith("." + path)],
                 [c for c in candidates if c.rsplit(".", 1)[-1] == parts[-1]]):
        if 0 < len(pool) <= 3:  # the closest to what was typed first (`glu.seeds`: glue's, then trend's)
            return sorted(pool, key=lambda c: -ratio(path, c))

    def score(candidate: str) -> float:
        tail = ".".join(candidate.split(".")[-depth:])
        under = ratio(rest, candidate[len(prefix):]) if candidate.startswith(prefix) else 0.0
        return max(under, ratio(rest, tail))

    scores = {c: score(c) for c in candidates}
    best = max(scores.values(), default=0.0)
    if best < 0.6:
        return []
    tied = [c for c, v in scores.items() if v == best]
    under = [c for c in tied if c.startswith(prefix)]  # a tie goes to the section the user is in
    return (under or tied)[:3]


def _unknown_key(root: type, path: str, prefix: str, valid: list[str], section: bool) -> str:
    """The message for the unknown dotted `path` (as the user wrote it; `prefix` is its part that
    exists, `valid` the keys there): the nearest full paths of the tree of `root` that are sections
    (`section=True`, a mapping was given) or values, else the valid keys at `prefix`."""
    paths = [p for p, is_section in config_paths(root).items() if is_section == section]
    local = [prefix + v for v in valid if prefix + v not in paths]  # the keys of a named entry (per_task.SST-2)
    near = nearest_paths(path, paths + local, prefix)
    if near:
        names = [f"'{p}'" for p in near]
        either = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        return f"unknown {key_noun(root)} '{path}'; did you mean {either}?"
    where = f" in '{prefix.rstrip('.')}'" if prefix else ""
    return f"unknown {key_noun(root)} '{path}'; valid keys{where}: {', '.join(prefix + v for v in valid)}"


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str, noun: str = "config key") -> Any:
    """Convert a plain value (or a command-line string) to the field's declared type `tp`; a bad one
    is a `ConfigError` naming `key` (a `noun` of its tree: config key, recipe key, argument)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return None if value is None else coerce(value, inner, key, noun)
    try:
        if typing.get_origin(tp) is list:
            if isinstance(value, str):  # "1e-4,3e-4" or "[1e-4, 3e-4]"; "" is the empty list
                value = [x.strip() for x in value.strip().strip("[]").split(",") if x.strip()]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]  # YAML `lrs: 3e-4`
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            return [_scalar(x, args[0]) for x in value]
        return _scalar(value, tp)
    except (TypeError, ValueError):
        raise ConfigError(f"{noun} '{key}' expects {type_name(tp)}, got {value!r}") from None


def _scalar(value: Any, tp: Any) -> Any:
    if tp is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return bool(value)
    if isinstance(value, (dict, list)) and tp in (int, float, str):
        raise ValueError(value)
    if tp is int:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if isinstance(value, str) and ("e" in value.lower() or "." in value):
            number = float(value)
            if not number.is_integer():
                raise ValueError(value)
            return int(number)
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if tp is str:
        return str(value)
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `section.key=value` strings in order to the tree `cfg` (a `Config`, or another tree of
    `Section`s such as the experiment recipe); returns a new tree, validated as a whole."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        path, value = item.split("=", 1)
        _set_path(data, type(cfg), path.strip(), value)
    return from_dict(type(cfg), data).validate()


def _set_path(data: dict, root: type, path: str, value: str) -> None:
    """Set the dotted `path` of the plain tree `data` (of dataclass `root`) to the string `value`,
    checking each part against the types. Inside a free mapping (`dict[str, Any]`) the rest of the
    path nests (`pretrain.train.lr=1e-3`); inside a `dict[str, Dataclass]` the next part is the
    entry's name (`glue.per_task.SST-2.epochs=1`); a field with a `parse` metadata takes its string
    form whole (`glue.per_task="SST-2:epochs=1"`)."""
    noun, parts = key_noun(root), path.split(".")
    node, cls, depth = data, root, 0
    while True:
        part, prefix = parts[depth], ".".join(parts[:depth]) + ("." if depth else "")
        types = _field_types(cls)
        if part not in types:
            raise ConfigError(_unknown_key(root, path, prefix, list(types), section=False))
        tp, item_type = types[part], _mapping_of(types[part])
        if depth == len(parts) - 1:
            parse = next(f.metadata.get("parse") for f in dataclasses.fields(cls) if f.name == part)
            if parse:
                node[part] = parse(value)  # plain values: later dotted overrides of its entries merge
            elif dataclasses.is_dataclass(tp) or item_type is not None:
                raise ConfigError(f"{noun} '{path}' is a section; set one of its keys")
            else:
                node[part] = value
            return
        if item_type is Any:  # a free mapping: the rest of the path nests
            node = node.setdefault(part, {})
            for p in parts[depth + 1:-1]:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{noun} '{path}': {p} is a value, not a section")
            node[parts[-1]] = value
            return
        if item_type is not None:  # dict[str, Dataclass]: the entry's name, then its keys
            if depth + 1 == len(parts) - 1:
                raise ConfigError(f"{noun} '{path}' is an entry; set one of its keys")
            node = node.setdefault(part, {}).setdefault(parts[depth + 1], {})
            cls, depth = item_type, depth + 2
            continue
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{noun} '{prefix}{part}' is a value, not a section")
        cls, node, depth = tp, node[part], depth + 1


def with_values(cfg: Any, values: dict[str, Any], root: type | None = None) -> Any:
    """A new (unfrozen) tree: `cfg` with the dotted paths of `values` set to typed values, e.g.
    `{"data.corpus": path, "model.vocab_size": 8192}`, built (and checked) like a recipe."""
    data = to_dict(cfg)
    for path, value in values.items():
        *parents, key = path.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[key] = value
    out = from_dict(root or type(cfg), data)
    return out.validate() if isinstance(out, Config) else out


def load_recipe(name_or_path: str) -> Config:
    """A recipe by name (`tiny`, `small`, `base`, `large`, `xl`) or a YAML/JSON file path, not yet
    validated as a whole (a recipe may leave the teacher to the command line)."""
    path = Path(name_or_path)
    if not path.is_file():
        candidates = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"recipe {name_or_path!r} is neither a file nor one of: {', '.join(candidates)}")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - any parse error becomes one line for the user
        raise ConfigError(f"recipe {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: "
                          f"{str(err).splitlines()[0]}") from None
    return from_dict(Config, data or {})


def build_config(recipe: str, overrides: list[str] = ()) -> Config:
    """Recipe + `key=value` overrides (e.g. `mode=tcd`), validated as a whole."""
    return apply_overrides(load_recipe(recipe), list(overrides))
