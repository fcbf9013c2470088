"""The config tree's answers to unknown keys: the nearest *full* path, from an override or a recipe."""
from __future__ import annotations

import re

import pytest

from tcd_ds.config import Config, ConfigError, apply_overrides, config_paths, from_dict, nearest_paths


def _override_error(item: str) -> str:
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [item])
    return str(err.value)


@pytest.mark.parametrize("item, meant", [
    ("moe.ep_size=2", "model.moe.ep_size"),  # a leading section left out (once: "did you mean 'mode'?")
    ("ep_size=2", "model.moe.ep_size"),  # only the key
    ("train.ep_size=2", "model.moe.ep_size"),  # the key under the wrong section
    ("moe.ep_sise=2", "model.moe.ep_size"),  # a section left out and a typo
    ("train.jiter=0.1", "model.moe.jitter"),
    ("trian.max_steps=3", "train.max_steps"),  # a typo in the section
    ("mdoel.moe.top_k=2", "model.moe.top_k"),
    ("model.mo.top_k=2", "model.moe.top_k"),  # a typo in the middle
    ("model.moe.num_expert=8", "model.moe.num_experts"),  # a typo in the key
    ("lr=1e-3", "train.lr"),
    ("modle=tcd", "mode"),
])
def test_unknown_override_suggests_the_nearest_full_path(item, meant):
    path = item.split("=")[0]
    assert _override_error(item) == f"unknown config key '{path}'; did you mean '{meant}'?"


def test_ambiguous_keys_name_every_candidate_and_far_keys_list_the_section():
    assert _override_error("distill.weight=1") == ("unknown config key 'distill.weight'; did you mean "
                                                   "'distill.weight_t', 'distill.weight_i' or 'distill.weight_a'?")
    msg = _override_error("model.moe.zzz=1")
    assert msg.startswith("unknown config key 'model.moe.zzz'; valid keys in 'model.moe': model.moe.num_experts, ")
    assert "did you mean" not in _override_error("model.foo=1")  # never a far-off key for a shared prefix
    assert _override_error("foo=1").startswith("unknown config key 'foo'; valid keys: mode, seed, ")


def test_recipe_keys_suggest_sections_for_mappings_and_values_otherwise():
    def error(data: dict) -> str:
        with pytest.raises(ConfigError) as err:
            from_dict(Config, data)
        return str(err.value)

    assert error({"moe": {"ep_size": 2}}) == "unknown config key 'moe'; did you mean 'model.moe'?"
    assert error({"trian": {"max_steps": 1}}) == "unknown config key 'trian'; did you mean 'train'?"
    assert error({"model": {"moe": {"top": 1}}}) == \
        "unknown config key 'model.moe.top'; did you mean 'model.moe.top_k'?"
    assert error({"ep_size": 2}) == "unknown config key 'ep_size'; did you mean 'model.moe.ep_size'?"


def test_config_paths_and_nearest_paths():
    paths = config_paths()
    assert paths["model"] and paths["model.moe"] and not paths["model.moe.ep_size"] and not paths["mode"]
    assert set(paths) >= {"train.lr", "data.vocab", "teacher.path", "distill.weight_t"}
    leaves = [p for p, section in paths.items() if not section]
    assert nearest_paths("moe.ep_size", leaves) == ["model.moe.ep_size"]
    assert nearest_paths("zzzz", leaves) == []
    assert nearest_paths("model.moe.topk", leaves, "model.moe.") == ["model.moe.top_k"]


def test_a_frozen_tree_is_read_only_and_with_values_builds_a_new_one():
    """The resolved run config (`tcd_ds.train.resolve_run`) is frozen: a builder that tried to change
    it (as build_data and build_model once changed data.corpus, data.vocab and model.vocab_size) fails."""
    from tcd_ds.config import build_config, freeze, with_values

    cfg = freeze(build_config("tiny", ["mode=moe"]))
    for section, key in ((cfg.data, "corpus"), (cfg.model, "vocab_size"), (cfg.model.moe, "top_k"), (cfg, "mode")):
        with pytest.raises(AttributeError, match="read-only"):
            setattr(section, key, getattr(section, key))
    new = with_values(cfg, {"data.corpus": "/x", "model.vocab_size": "700"})
    assert (new.data.corpus, new.model.vocab_size, cfg.data.corpus) == ("/x", 700, build_config("tiny", ["mode=moe"]).data.corpus)
    new.data.corpus = "/y"  # a new tree is not frozen
    with pytest.raises(ConfigError, match="model.vocab_size must be >= 1"):
        with_values(cfg, {"model.vocab_size": 0})


# --- the one mechanism for other trees (the experiment recipe): lists, optionals, mappings ---------

from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from tcd_ds.config import Section  # noqa: E402


@dataclass
class _Entry(Section):
    lrs: list[float] | None = None
    epochs: int | None = None


def _parse_entries(text: str) -> dict:
    return {name: {"epochs": n} for name, n in (x.split(":") for x in text.split(";"))}


@dataclass
class _Tree(Section):
    KEY_NOUN = "recipe key"
    seeds: list[int] = field(default_factory=lambda: [1])
    free: dict[str, Any] = field(default_factory=dict)
    entries: dict[str, _Entry] = field(default_factory=dict, metadata={"parse": _parse_entries})

    def validate(self) -> "_Tree":
        return self


def test_lists_optionals_free_mappings_and_named_entries_take_overrides():
    tree = apply_overrides(_Tree(), ["seeds=4,5", "free.train.lr=1e-3", "free.seed=7",
                                     "entries.SST-2.lrs=3e-4,1e-4", "entries.SST-2.epochs=1.0"])
    assert tree.seeds == [4, 5] and tree.free == {"train": {"lr": "1e-3"}, "seed": "7"}
    assert tree.entries == {"SST-2": _Entry(lrs=[3e-4, 1e-4], epochs=1)}
    assert apply_overrides(_Tree(), ["seeds=", "entries=a:2;b:3", "entries.b.lrs=1e-4"]) == \
        _Tree(seeds=[], entries={"a": _Entry(epochs=2), "b": _Entry(lrs=[1e-4], epochs=3)})  # "": the empty list
    assert from_dict(_Tree, {"seeds": [2, "3"], "entries": {"x": {"lrs": 1e-4}}}) == \
        _Tree(seeds=[2, 3], entries={"x": _Entry(lrs=[1e-4])})  # YAML `lrs: 1e-4` is a one-item list


@pytest.mark.parametrize("item, message", [
    ("seeds=one", "recipe key 'seeds' expects a list of int, got"),
    ("seeds=1.5", "recipe key 'seeds' expects a list of int"),
    ("entries.a.epochs=two", "recipe key 'entries.a.epochs' expects int, got 'two'"),
    ("entries.a.epoch=2", "unknown recipe key 'entries.a.epoch'; did you mean 'entries.a.epochs'?"),
    ("entries.a=2", "recipe key 'entries.a' is an entry; set one of its keys"),
    ("free=1", "recipe key 'free' is a section; set one of its keys"),
    ("seeds.x=1", "recipe key 'seeds' is a value, not a section"),
    ("sedes=1", "unknown recipe key 'sedes'; did you mean 'seeds'?"),
])
def test_bad_values_in_other_trees_are_one_line_in_their_own_words(item, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(_Tree(), [item])
    assert message in str(err.value)


@pytest.mark.parametrize("items, message", [
    (["train.stop_at_val_loss=-1"], "train.stop_at_val_loss must be >= 0 (0: off)"),
    (["train.stop_at_val_loss=4.2", "train.eval_every=0"], "needs train.eval_every > 0, got 4.2 with eval_every 0"),
])
def test_stop_at_val_loss_needs_periodic_evals(items, message):
    from tcd_ds.config import build_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config("tiny", ["mode=moe", *items])
    assert build_config("tiny", ["mode=moe", "train.stop_at_val_loss=4.2"]).train.stop_at_val_loss == 4.2
