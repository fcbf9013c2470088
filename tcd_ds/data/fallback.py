"""Offline fallback for the default corpus and vocabulary when ``../shared/data`` is absent.

The defaults of ``DataConfig.corpus`` / ``DataConfig.vocab`` point into ``../shared/data`` (a
Wikipedia extract and the BERT uncased vocab). On a machine without that directory,
``resolve_sources`` substitutes, with one warning line per substitution on stderr:

* **corpus** -> the *Python Language Reference* text that CPython ships with its standard library
  as ``pydoc_data.topics`` (the text ``help()`` shows): human-written English prose (with grammar
  rules and code examples), present on every full Python install, no network needed. It is written
  as a plain-text directory ``<cache_dir>/fallback-corpus-<hash>/`` holding one ``.txt`` document
  per topic (reStructuredText heading underlines such as ``*****`` dropped) and a ``SOURCE.json``;
* **vocab** -> an uncased BERT-style WordPiece ``vocab.txt`` trained with the ``tokenizers``
  library on whichever corpus is in use (the fallback corpus, or the user's own corpus, first
  ``VOCAB_TRAIN_MAX_BYTES`` of it), in ``<cache_dir>/fallback-vocab-<hash>/``. Ids 0-4 are
  ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (BERT's relative order, [PAD] = 0). Its size is at most
  ``FALLBACK_VOCAB_SIZE``; a small corpus saturates below it (read the size with
  ``special_ids(load_tokenizer(path)).vocab_size``); the trainer adopts it (``is_fallback_vocab``).

A vocab trained on purpose: ``data.vocab=wordpiece:N`` asks for the same uncased WordPiece recipe
with at most ``N`` tokens, trained on the corpus in use (the first ``VOCAB_TRAIN_MAX_BYTES`` of it,
held-out split included, as BERT's own vocab was), content-hashed and cached exactly like the
fallback vocab; the model's ``vocab_size`` follows it. It is a recipe choice for speed: with hidden
128 an 8,192-token vocab makes the MLM head ~4x cheaper than BERT's 30,522 (see ``docs/performance.md``).

Only the *default* values fall back: an explicit path that is missing raises ``FileNotFoundError``
naming it. Hub names (not path-like) pass through unchanged. Both artefacts are deterministic
(content-hashed names, identical bytes on every run and machine with the same Python and
tokenizers), written to a temporary directory and renamed into place under an ``fcntl`` lock, so
concurrent ranks build once and the others wait and reuse.

Determinism note: the ``tokenizers`` WordPiece trainer numbers its ``##c`` pieces in hash-map order
and breaks count ties by id, so two processes may train different vocabularies. Registering the
alphabet (chosen here by count, then code point) and every ``##c`` piece up front, in sorted order,
fixes all ids before training and makes the result reproducible.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from ..config import MIN_TRAINED_VOCAB, DataConfig, trained_vocab_size
from ..atomic import publish_dir
from .corpus import is_local_source, iter_documents
from .tokenizer import REQUIRED_SPECIAL_TOKENS, VOCAB_FILENAME, resolve_vocab_path

FALLBACK_VOCAB_SIZE = 8192  # an upper bound: the trainer stops when no pair occurs min_frequency times
VOCAB_MIN_FREQUENCY = 2
VOCAB_LIMIT_ALPHABET = 1000
VOCAB_TRAIN_MAX_BYTES = 64 << 20  # of a user's own corpus (the fallback corpus is ~0.5 MB)
CORPUS_PREFIX = "fallback-corpus-"
VOCAB_PREFIX = "fallback-vocab-"
_FORMAT = 1  # bump when the corpus cleaning or the vocab recipe changes
_UNDERLINE = re.compile(r"[ \t]*([*=~^#+-])\1{2,}[ \t]*")  # a reST heading underline / overline


def warn_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ corpus
def reference_documents() -> dict[str, str]:
    """The Python Language Reference topics bundled with CPython (``pydoc_data.topics``), cleaned:
    topic name -> text, in sorted topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise FileNotFoundError(
            "the default corpus is missing and so is the fallback: this Python has no pydoc_data "
            f"(its standard-library documentation) ({exc}); set data.corpus to a text file or directory") from None
    out = {}
    for name in sorted(topics):
        lines = [line.rstrip() for line in topics[name].splitlines() if not _UNDERLINE.fullmatch(line)]
        text = "\n".join(lines).strip()
        if text:
            out[name] = text + "\n"
    return out


def _digest(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def fallback_corpus(cache_dir: str | os.PathLike[str]) -> Path:
    """Materialise the fallback corpus under ``cache_dir`` (once) and return its directory."""
    docs = reference_documents()
    key = _digest([f"format={_FORMAT}", *(p for kv in docs.items() for p in kv)])
    final = Path(cache_dir).expanduser().resolve() / f"{CORPUS_PREFIX}{key[:16]}"

    def build(tmp: Path) -> None:
        width = len(str(len(docs)))
        for i, (name, text) in enumerate(docs.items()):
            safe = re.sub(r"[^A-Za-z0-9_-]+", "_", name)
            (tmp / f"{i:0{width}d}-{safe}.txt").write_text(text, encoding="utf-8")
        (tmp / "SOURCE.json").write_text(json.dumps(corpus_stats(docs) | {"sha256": key}, indent=1) + "\n")

    return publish_dir(final, build)


def corpus_stats(docs: dict[str, str] | None = None) -> dict[str, object]:
    """What the fallback corpus is and how big: documents, UTF-8 bytes and whitespace-separated words."""
    docs = reference_documents() if docs is None else docs
    import pydoc_data.topics

    return {
        "source": "Python Language Reference, bundled with CPython as pydoc_data.topics",
        "python": sys.version.split()[0], "file": pydoc_data.topics.__file__,
        "documents": len(docs), "bytes": sum(len(t.encode("utf-8")) for t in docs.values()),
        "words": sum(len(t.split()) for t in docs.values()),
    }


# ------------------------------------------------------------------------------------------- vocab
def fallback_vocab(corpus: str | os.PathLike[str], cache_dir: str | os.PathLike[str],
                   vocab_size: int = FALLBACK_VOCAB_SIZE) -> Path:
    """Train (once) an uncased WordPiece vocab on ``corpus``; return the path of its ``vocab.txt``."""
    docs = list(iter_documents(os.fspath(corpus), max_bytes=VOCAB_TRAIN_MAX_BYTES))
    if not docs:
        raise ValueError(f"cannot train a fallback vocab: corpus {corpus} has no documents")
    settings = {"format": _FORMAT, "vocab_size": vocab_size, "min_frequency": VOCAB_MIN_FREQUENCY,
                "limit_alphabet": VOCAB_LIMIT_ALPHABET, "lowercase": True, "specials": REQUIRED_SPECIAL_TOKENS}
    key = _digest([json.dumps(settings, sort_keys=True), *docs])
    final = Path(cache_dir).expanduser().resolve() / f"{VOCAB_PREFIX}{key[:16]}"

    def build(tmp: Path) -> None:
        tokens = train_wordpiece(docs, vocab_size)
        (tmp / VOCAB_FILENAME).write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
        info = {"corpus": os.fspath(corpus), "documents": len(docs), "tokens": len(tokens), "sha256": key,
                **settings}
        (tmp / "fallback.json").write_text(json.dumps(info, indent=1) + "\n")

    return publish_dir(final, build) / VOCAB_FILENAME


def train_wordpiece(docs: list[str], vocab_size: int = FALLBACK_VOCAB_SIZE) -> list[str]:
    """An uncased BERT WordPiece vocabulary of ``docs`` (tokens in id order), deterministically."""
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    normalize = tok._tokenizer.normalizer.normalize_str
    counts: collections.Counter[str] = collections.Counter()
    for doc in docs:
        counts.update(normalize(doc))
    alphabet = sorted((c for c in counts if not c.isspace()), key=lambda c: (-counts[c], c))[:VOCAB_LIMIT_ALPHABET]
    pieces = ["##" + c for c in sorted(alphabet)]
    tok.train_from_iterator(docs, vocab_size=vocab_size, min_frequency=VOCAB_MIN_FREQUENCY,
                            limit_alphabet=len(alphabet), initial_alphabet=alphabet,
                            special_tokens=[*REQUIRED_SPECIAL_TOKENS, *pieces], show_progress=False,
                            wordpieces_prefix="##")
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if [vocab[t] for t in tokens] != list(range(len(tokens))) or tokens[:5] != list(REQUIRED_SPECIAL_TOKENS):
        raise RuntimeError("WordPiece training gave non-contiguous ids or misplaced special tokens")
    return tokens


def is_fallback_vocab(vocab: str | os.PathLike[str]) -> bool:
    """Whether ``vocab`` is a vocab made by ``fallback_vocab`` (its size is then the model's)."""
    p = Path(os.fspath(vocab))
    return (p.parent.name if p.name == VOCAB_FILENAME else p.name).startswith(VOCAB_PREFIX)


# ----------------------------------------------------------------------------------------- resolve
def _default_missing(value: str, default: str | None, field: str) -> bool:
    if default is None:
        default = getattr(DataConfig(), field)
    return value == default and not Path(value).expanduser().exists()


def vocab_falls_back(vocab: str, default_vocab: str | None = None) -> bool:
    """Whether ``resolve_sources`` will replace ``vocab`` by a trained one (the fallback, or an asked-for
    ``wordpiece:N``): its size is known only once trained, so checks made before ``build_data`` should
    not compare ``model.vocab_size``."""
    return trained_vocab_size(vocab) is not None or _default_missing(vocab, default_vocab, "vocab")


def resolve_sources(corpus: str, vocab: str, cache_dir: str,
                    warn: Callable[[str], None] | None = warn_stderr, *,
                    default_corpus: str | None = None, default_vocab: str | None = None,
                    vocab_size: int = FALLBACK_VOCAB_SIZE) -> tuple[str, str]:
    """``(corpus, vocab)`` to use: unchanged when they exist (or are hub names); the fallbacks (see
    module doc) for a missing *default* (``DataConfig()``'s, unless ``default_*`` is given), with one
    ``warn`` line each (``None``: silent). A missing non-default path raises ``FileNotFoundError``."""
    corpus_missing = _default_missing(corpus, default_corpus, "corpus")
    trained = trained_vocab_size(vocab)
    vocab_missing = trained is None and vocab_falls_back(vocab, default_vocab)
    try:  # explicit input is checked before anything is built
        if not corpus_missing:
            is_local_source(corpus)
        if not vocab_missing and trained is None:
            resolve_vocab_path(vocab)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} (an explicit data path: no fallback is used for it)") from None
    say = warn or (lambda message: None)
    if corpus_missing:
        path = fallback_corpus(cache_dir)
        s = json.loads((path / "SOURCE.json").read_text())
        say(f"warning: data.corpus {corpus} not found (the default, absent here): falling back to real "
            f"English text, the Python {s['python']} Language Reference bundled with CPython as pydoc_data.topics "
            f"({s['documents']} documents, {s['bytes'] / 1e3:.0f} KB, {s['words']} words) in {path}")
        corpus = str(path)
    if vocab_missing:
        path = fallback_vocab(corpus, cache_dir, vocab_size)
        n = sum(1 for _ in path.open(encoding="utf-8"))
        say(f"warning: data.vocab {vocab} not found (the default, absent here): falling back to an "
            f"uncased WordPiece vocab of {n} tokens trained on {corpus} ({path}); model.vocab_size follows it")
        vocab = str(path)
    elif trained is not None:
        if trained < MIN_TRAINED_VOCAB:
            raise ValueError(f"data.vocab=wordpiece:{trained}: the size must be >= {MIN_TRAINED_VOCAB}")
        path = fallback_vocab(corpus, cache_dir, trained)
        n = sum(1 for _ in path.open(encoding="utf-8"))
        say(f"data.vocab=wordpiece:{trained}: an uncased WordPiece vocab of {n} tokens trained on {corpus} "
            f"({path}); model.vocab_size follows it")
        vocab = str(path)
    return corpus, vocab
