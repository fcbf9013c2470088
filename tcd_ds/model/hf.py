"""Hugging Face interchange: config.json <-> ModelConfig, state dicts, and model directories.

A dense tcd-ds model's state dict uses Hugging Face's `BertForMaskedLM` key names, so conversion is
only about the few keys that differ: the tied decoder (`cls.predictions.decoder.*`, which HF also
writes) and buffers. MoE layers add `bert.encoder.layer.i.moe.*` in the canonical expert layout
(router.weight [E, H], experts.w1 [E, H, F], b1 [E, F], w2 [E, F, H], b2 [E, H]) and config.json
gets a `tcd_moe` section; such a directory loads back here.

Hugging Face's `BertForMaskedLM` runs a dense post-LN export as is (config.json says `model_type:
bert`). An export it cannot run (MoE layers, or a pre-LN encoder) is a `transformers` custom-code
model instead: `model_type: tcd_moe_bert`, an `auto_map` in config.json, and `tcd_ds/model/hf_remote.py`
(self-contained: torch and transformers only) copied beside the weights as `modeling_tcd_moe_bert.py`,
so `AutoModelForMaskedLM.from_pretrained(dir, trust_remote_code=True)` (and `AutoModel`,
`AutoModelForSequenceClassification`) load the same weights, anywhere, offline.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from tcd_ds.config import ModelConfig, MoEConfig

SAFETENSORS, TORCH_BIN = "model.safetensors", "pytorch_model.bin"
REMOTE_MODEL_TYPE = "tcd_moe_bert"  # config.json's model_type of an export that needs our modeling file
REMOTE_CODE_FILE = "modeling_tcd_moe_bert.py"  # the copy of hf_remote.py beside the weights
_REMOTE_CODE_SOURCE = Path(__file__).with_name("hf_remote.py")
_AUTO_MAP = {auto: f"{REMOTE_CODE_FILE[:-3]}.{cls}" for auto, cls in (
    ("AutoConfig", "TcdMoeBertConfig"), ("AutoModel", "TcdMoeBertModel"),
    ("AutoModelForMaskedLM", "TcdMoeBertForMaskedLM"),
    ("AutoModelForSequenceClassification", "TcdMoeBertForSequenceClassification"))}
_HF_TO_OURS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position", "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps", "hidden_dropout_prob": "hidden_dropout",
    "attention_probs_dropout_prob": "attention_dropout", "initializer_range": "initializer_range",
    "pad_token_id": "pad_token_id",
}


class CheckpointError(ValueError):
    """A model directory or file that cannot be used: one line for the user."""


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face BERT config.json dict (plus our optional `tcd_moe` section)."""
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_python"):
        raise CheckpointError(f"hidden_act={act!r} is not supported (tcd-ds BERT uses exact gelu)")
    positions = hf.get("position_embedding_type", "absolute")
    if positions not in ("absolute", "rotary"):
        raise CheckpointError(f"position_embedding_type={positions!r} is not supported (absolute or rotary)")
    kwargs = {ours: hf[theirs] for theirs, ours in _HF_TO_OURS.items() if hf.get(theirs) is not None}
    moe = MoEConfig(**hf["tcd_moe"]) if hf.get("tcd_moe") else MoEConfig()
    cfg = ModelConfig(**kwargs, moe=moe, layer_norm=hf.get("tcd_layer_norm", "post"), position_encoding=positions)
    cfg.validate()
    return cfg


def needs_remote_code(cfg: ModelConfig) -> bool:
    """Whether Hugging Face's BERT cannot run this model (MoE layers, pre-LN or rotary positions): its
    export then carries our modeling file."""
    return bool(cfg.moe.num_experts) or cfg.layer_norm != "post" or cfg.position_encoding != "absolute"


def config_to_hf(cfg: ModelConfig) -> dict:
    """A config.json that `transformers.BertConfig` reads (the MoE part rides along as `tcd_moe`);
    for a model that BERT cannot run, `model_type` names our custom-code model instead."""
    out = {theirs: getattr(cfg, ours) for theirs, ours in _HF_TO_OURS.items()}
    out.update(model_type="bert", architectures=["BertForMaskedLM"], hidden_act="gelu",
               position_embedding_type=cfg.position_encoding)
    if cfg.moe.num_experts:
        moe = dataclasses.asdict(cfg.moe)
        moe["backend"], moe["ep_size"] = "torch", 1  # an export is backend-neutral
        out["tcd_moe"] = moe
        out["architectures"] = ["TcdMoeBertForMaskedLM"]
    if cfg.layer_norm != "post":  # not a Hugging Face BERT (post-LN): our loader or modeling file runs it
        out["tcd_layer_norm"] = cfg.layer_norm
    if needs_remote_code(cfg):
        out.update(model_type=REMOTE_MODEL_TYPE, architectures=["TcdMoeBertForMaskedLM"])
    return out


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names, experts in the canonical layout."""
    sd, converted = {}, []
    for name, module in model.named_modules():
        if hasattr(module, "canonical_state_dict"):  # non-canonical MoE backends convert themselves
            sd.update({f"{name}.{k}": v for k, v in module.canonical_state_dict().items()})
            converted.append(f"{name}.")
    skip = tuple(converted)
    for k, v in model.state_dict().items():
        if not k.startswith(skip):
            sd[k] = v
    if "cls.predictions.bias" in sd:
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
        sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
    return sd


def load_hf_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load Hugging Face-named weights (a `BertForMaskedLM`, a `BertModel` or our export) into `model`."""
    own = model.state_dict()
    ours_prefixed, theirs_prefixed = any(k.startswith("bert.") for k in own), any(k.startswith("bert.") for k in sd)
    if ours_prefixed and not theirs_prefixed:  # a bare BertModel checkpoint into a model with a head
        sd = {f"bert.{k}": v for k, v in sd.items()}
    elif theirs_prefixed and not ours_prefixed:  # a full checkpoint into a bare encoder: drop the heads
        sd = {k[len("bert."):]: v for k, v in sd.items() if k.startswith("bert.")}
    sd = {k: v for k, v in sd.items()
          if not k.endswith("position_ids") and not k.startswith("cls.predictions.decoder.")}
    if not any(k.endswith("pooler.dense.weight") for k in own):
        sd = {k: v for k, v in sd.items() if "pooler." not in k}
    if "cls.predictions.bias" not in own:
        sd = {k: v for k, v in sd.items() if not k.startswith("cls.")}
    for name, module in model.named_modules():
        if hasattr(module, "load_canonical_state_dict"):
            prefix = f"{name}."
            module.load_canonical_state_dict({k[len(prefix):]: sd.pop(k) for k in list(sd) if k.startswith(prefix)})
            own = {k: v for k, v in own.items() if not k.startswith(prefix)}
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointError(f"weight {k} has shape {tuple(v.shape)} in the checkpoint but "
                                  f"{tuple(own[k].shape)} in the model")
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(f"checkpoint does not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def save_pretrained(model: nn.Module, cfg: ModelConfig, directory: str | Path) -> Path:
    """Write config.json + model.safetensors (Hugging Face layout), and for a model Hugging Face's BERT
    cannot run, our modeling file with config.json's `auto_map` pointing at it (`trust_remote_code`).
    Every file is written atomically with the user's file mode; config.json comes last."""
    from tcd_ds.atomic import save_safetensors_atomic, write_atomic, write_json_atomic

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu().clone() for k, v in to_hf_state_dict(model).items()}
    save_safetensors_atomic(sd, directory / SAFETENSORS, metadata={"format": "pt"})
    hf = config_to_hf(cfg)
    if needs_remote_code(cfg):
        code = _REMOTE_CODE_SOURCE.read_bytes()
        write_atomic(directory / REMOTE_CODE_FILE, lambda tmp: tmp.write_bytes(code))
        hf["auto_map"] = dict(_AUTO_MAP)
    else:  # a plain BERT export: no stale modeling file from an earlier MoE export in the same place
        (directory / REMOTE_CODE_FILE).unlink(missing_ok=True)
    write_json_atomic(directory / "config.json", hf)
    return directory


def read_pretrained(directory: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """config.json and weights (safetensors or pytorch_model.bin) of a local model directory."""
    directory = Path(directory)
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{directory} is not a model directory: {cfg_file} is missing")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {err}") from None
    if hf.get("model_type", "bert") not in ("bert", REMOTE_MODEL_TYPE):
        raise CheckpointError(f"{cfg_file} describes a {hf.get('model_type')!r} model, not BERT")
    cfg = config_from_hf(hf)
    try:
        if (directory / SAFETENSORS).is_file():
            from safetensors.torch import load_file

            sd = load_file(str(directory / SAFETENSORS))
        elif (directory / TORCH_BIN).is_file():
            sd = torch.load(directory / TORCH_BIN, map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"{directory} holds no weights ({SAFETENSORS} or {TORCH_BIN})")
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - a truncated or corrupt file of either format
        raise CheckpointError(f"cannot read the weights in {directory}: {str(err).splitlines()[0]}") from None
    return cfg, sd
