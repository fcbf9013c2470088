"""Tokenizer loading, special-token ids and a stable tokenizer fingerprint.

A local ``vocab.txt`` (or a directory holding one) gives an uncased BERT WordPiece tokenizer built
in-process (no network).  Anything else is treated as a Hugging Face hub name and passed to
``AutoTokenizer.from_pretrained``; offline that fails with one clear line.

Note (transformers >= 5): ``BertTokenizerFast(vocab_file=...)`` silently ignores ``vocab_file`` and
builds a 5-token vocabulary, so the vocabulary is parsed here, validated, and passed as ``vocab=``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paths import looks_like_path

REQUIRED_SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB_FILENAME = "vocab.txt"


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens of a BERT-style tokenizer, plus the total vocabulary size."""

    pad: int
    cls: int
    sep: int
    mask: int
    unk: int
    vocab_size: int

    @property
    def all(self) -> tuple[int, ...]:
        """Every special id (never masked, never drawn as a random replacement), sorted."""
        return tuple(sorted({self.pad, self.cls, self.sep, self.mask, self.unk}))


def read_vocab(path: str | os.PathLike[str]) -> dict[str, int]:
    """Parse and validate a WordPiece ``vocab.txt`` (one token per line, id = line number).

    Raises ``FileNotFoundError`` if missing and ``ValueError`` (one line naming the file) if empty,
    not UTF-8, holding duplicate tokens, or missing one of [PAD]/[UNK]/[CLS]/[SEP]/[MASK].
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocab file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"malformed vocab file {path}: not UTF-8 text ({exc.reason})") from None
    tokens = text.split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    tokens = [t.rstrip("\r") for t in tokens]
    if not any(t.strip() for t in tokens):
        raise ValueError(f"malformed vocab file {path}: it is empty")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise ValueError(f"malformed vocab file {path}: token {tok!r} appears twice (lines {vocab[tok] + 1} and {i + 1})")
        vocab[tok] = i
    missing = [t for t in REQUIRED_SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"malformed vocab file {path}: missing special tokens {' '.join(missing)} "
                         f"({len(vocab)} tokens read; expected a BERT WordPiece vocab.txt)")
    return vocab


def resolve_vocab_path(name_or_path: str) -> Path | None:
    """The vocab file ``name_or_path`` points at, ``None`` if it is not a local path."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        vocab = p / VOCAB_FILENAME
        if not vocab.is_file():
            raise FileNotFoundError(f"tokenizer directory {p} has no {VOCAB_FILENAME}")
        return vocab
    if p.is_file():
        return p
    if looks_like_path(name_or_path, (".txt",)):
        raise FileNotFoundError(f"tokenizer vocab file not found: {p}")
    return None


def load_tokenizer(name_or_path: str | os.PathLike[str], do_lower_case: bool = True) -> Any:
    """Load a tokenizer.

    * a path to a ``vocab.txt`` file or to a directory containing one -> uncased BERT WordPiece
      (``transformers.BertTokenizerFast``), built locally;
    * otherwise a Hugging Face hub name -> ``AutoTokenizer.from_pretrained(name)``; failures
      (e.g. offline) become one ``OSError`` line naming the tokenizer.
    """
    name = os.fspath(name_or_path)
    vocab_path = resolve_vocab_path(name)
    if vocab_path is not None:
        from transformers import BertTokenizerFast

        vocab = read_vocab(vocab_path)
        tok = BertTokenizerFast(vocab=vocab, do_lower_case=do_lower_case)
        if len(tok) != len(vocab):  # guards against API drift (see module docstring)
            raise RuntimeError(f"tokenizer built from {vocab_path} has {len(tok)} tokens, vocab file has {len(vocab)}")
        tok.init_kwargs["vocab_file"] = str(vocab_path)
        return tok

    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - re-raised as one clear line
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise OSError(
            f"cannot load tokenizer {name!r}: not a local vocab file/dir and the hub is unreachable "
            f"or has no such tokenizer ({type(exc).__name__}: {detail})"
        ) from None


def special_ids(tokenizer: Any) -> SpecialIds:
    """The pad/cls/sep/mask/unk ids and the vocabulary size (``len(tokenizer)``, added tokens included)."""
    ids = {
        "pad": tokenizer.pad_token_id,
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "mask": tokenizer.mask_token_id,
        "unk": tokenizer.unk_token_id,
    }
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} lacks special tokens needed for MLM: {', '.join(missing)}")
    return SpecialIds(vocab_size=len(tokenizer), **ids)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable hex digest identifying how ``tokenizer`` maps text to ids (for cache keys).

    sha256 over the class name, the lowercasing flag, the full id-ordered vocabulary and, for
    tokenizers-backed tokenizers, the normalizer/pre-tokenizer/model configuration.
    """
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    lower = getattr(tokenizer, "do_lower_case", tokenizer.init_kwargs.get("do_lower_case") if hasattr(tokenizer, "init_kwargs") else None)
    h.update(f"|lower={lower}|".encode())
    for tok, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{tok}\n".encode("utf-8"))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        cfg = json.loads(backend.to_str())
        parts = {k: cfg.get(k) for k in ("normalizer", "pre_tokenizer")}
        model = dict(cfg.get("model") or {})
        model.pop("vocab", None)  # already hashed above, in id order
        parts["model"] = model
        h.update(json.dumps(parts, sort_keys=True).encode())
    return h.hexdigest()
