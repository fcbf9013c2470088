"""Read raw text corpora as a deterministic stream of documents.

Supported sources (``iter_documents(source)``):

* **WikiExtractor output** (a file, or a directory such as ``wikipedia-en-2015/`` with ``AA/wiki_00``
  ...): every ``<doc id=.. url=.. title=..>`` ... ``</doc>`` block is one document; the tags and the
  title line (the first line inside the block) are dropped.
* **WikiText** (``.tokens`` / ``.raw`` files, or any file whose first line is `` = Title = ``): an
  article heading `` = Title = `` starts a new document (the heading itself is dropped); section
  headings `` = = Name = = `` become plain ``Name`` lines; the tokenised-text escapes ``@-@``,
  ``@,@``, ``@.@`` become ``-``, ``,``, ``.`` and ``<unk>`` becomes ``[UNK]`` (the BERT unknown
  token, so it maps to one id rather than to ``< un ##k >``). CRLF line ends are handled.
* **plain text** (``.txt``): by default one document per file (``plain_text="file"``: right for
  novels, which are one continuous text); ``plain_text="paragraph"`` instead splits on blank lines
  (one document per paragraph, for corpora stored as blank-line separated documents).
* a **directory**: every ``*.txt``, ``*.raw``, ``*.tokens`` and WikiExtractor ``wiki_NN`` file under
  it (recursively, hidden entries skipped), in sorted relative-path order, each parsed as above.
* a **Hugging Face dataset** name (anything that is not an existing path and does not look like
  one): ``name``, ``name:config`` or ``name:config:split`` (split defaults to ``train``), e.g.
  ``wikitext:wikitext-2-raw-v1`` or ``wikipedia:20220301.en``, loaded with
  ``datasets.load_dataset``; rows of a ``wikitext*`` dataset are lines (grouped into articles as
  above), any other dataset gives one document per row of its ``text`` column.

Documents are stripped; empty documents are never yielded.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .paths import looks_like_path

TEXT_SUFFIXES: frozenset[str] = frozenset({".txt", ".raw", ".tokens"})
WIKITEXT_SUFFIXES: frozenset[str] = frozenset({".raw", ".tokens"})
PLAIN_TEXT_MODES: tuple[str, ...] = ("file", "paragraph")
_WIKIEXTRACTOR_NAME = re.compile(r"wiki_\d+")
_ARTICLE_HEADING = re.compile(r"= (?!=)(.*\S) =")  # on a stripped line: "= Title =" but not "= = Sub = ="
_SECTION_HEADING = re.compile(r"(?:= ){2,}(.*?)(?: =){2,}")
_WIKITEXT_ESCAPES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), ("<unk>", "[UNK]"))
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")
_SNIFF_BYTES = 1 << 16


# ----------------------------------------------------------------------------------------- sources
def is_local_source(source: str | os.PathLike[str]) -> bool:
    """True for an existing file/dir; raises ``FileNotFoundError`` for a missing path-like source."""
    s = os.fspath(source)
    if Path(s).expanduser().exists():
        return True
    if looks_like_path(s, TEXT_SUFFIXES):
        raise FileNotFoundError(f"corpus source not found: {s}")
    return False


def _is_corpus_file(path: Path) -> bool:
    return path.suffix in TEXT_SUFFIXES or bool(_WIKIEXTRACTOR_NAME.fullmatch(path.name))


def source_files(source: str | os.PathLike[str]) -> list[Path]:
    """The files of a local source in the deterministic order they are read.

    A file is returned as is; a directory gives its corpus files (see module doc), sorted by
    relative path. Raises ``FileNotFoundError`` if missing, ``ValueError`` if a directory holds none.
    """
    root = Path(os.fspath(source)).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"corpus source not found: {root}")
    files = [
        p for p in root.rglob("*")
        if p.is_file() and _is_corpus_file(p)
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    if not files:
        raise ValueError(f"corpus directory {root} holds no text files (*.txt, *.raw, *.tokens or WikiExtractor wiki_NN)")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def parse_hub_source(source: str) -> tuple[str, str | None, str]:
    """Split ``name[:config[:split]]`` into ``(name, config, split)``; split defaults to ``train``."""
    parts = source.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"bad dataset source {source!r}: expected name, name:config or name:config:split")
    name = parts[0]
    config = parts[1] or None if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def _load_hub_dataset(source: str) -> Any:
    """``datasets.load_dataset`` for a hub source; any failure becomes one ``OSError`` line."""
    name, config, split = parse_hub_source(source)
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - re-raised as one clear line
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise OSError(
            f"cannot load corpus {source!r} (dataset={name}, config={config}, split={split}): not a local "
            f"path, and the Hugging Face hub is unreachable or has no such dataset ({type(exc).__name__}: {detail})"
        ) from None


def describe_source(source: str | os.PathLike[str]) -> str:
    """A stable fingerprint (sha256 hex) of a corpus source, for cache keys.

    Local: the resolved root plus every file's relative path, size and mtime (ns), so editing or
    adding a file changes it. Hub: name/config/split plus the loaded dataset's own fingerprint.
    """
    s = os.fspath(source)
    if is_local_source(s):
        root = Path(s).expanduser().resolve()
        entries = []
        for f in source_files(root):
            st = f.stat()
            rel = f.name if root.is_file() else f.relative_to(root).as_posix()
            entries.append([rel, st.st_size, st.st_mtime_ns])
        payload: dict[str, Any] = {"kind": "local", "root": str(root), "files": entries}
    else:
        name, config, split = parse_hub_source(s)
        ds = _load_hub_dataset(s)
        payload = {"kind": "hub", "name": name, "config": config, "split": split,
                   "fingerprint": getattr(ds, "_fingerprint", None), "rows": len(ds)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def source_num_bytes(source: str | os.PathLike[str]) -> int | None:
    """Total size of a local source's files (for progress bars); ``None`` for hub datasets."""
    s = os.fspath(source)
    if not is_local_source(s):
        return None
    return sum(f.stat().st_size for f in source_files(s))


# ----------------------------------------------------------------------------------------- parsers
def iter_wikiextractor(lines: Iterable[str]) -> Iterator[str]:
    """Documents of WikiExtractor output: ``<doc ...>`` blocks without tags and title line."""
    body: list[str] | None = None
    title_pending = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("<doc ") or stripped == "<doc>":
            if body:  # unterminated previous doc
                doc = "\n".join(body).strip()
                if doc:
                    yield doc
            body, title_pending = [], True
        elif stripped == "</doc>":
            if body is not None:
                doc = "\n".join(body).strip()
                if doc:
                    yield doc
            body, title_pending = None, False
        elif body is not None:
            if title_pending:
                if stripped:  # the first non-empty line inside the block is the title
                    title_pending = False
                continue
            body.append(line.rstrip("\r\n"))
    if body:
        doc = "\n".join(body).strip()
        if doc:
            yield doc


def _wikitext_clean(line: str) -> str:
    s = line.strip()
    m = _SECTION_HEADING.fullmatch(s)
    if m:
        s = m.group(1)
    for old, new in _WIKITEXT_ESCAPES:
        s = s.replace(old, new)
    return s


def iter_wikitext(lines: Iterable[str]) -> Iterator[str]:
    """Articles of WikiText (``.tokens``/``.raw``): each `` = Title = `` line starts a new one.

    In the standard files a title line always follows a blank line, while table/equation lines
    inside articles can look like titles (`` = 1 <unk> / s ... = ``), so once the text has shown
    blank lines a title must follow one. Variants with blank lines stripped (``wiki.test.raw``
    here) cannot make that distinction and split on every title-shaped line.
    """
    body: list[str] = []
    prev_blank = True
    seen_blank = False
    for line in lines:
        stripped = line.strip()
        if not stripped:
            prev_blank = seen_blank = True
            continue
        if _ARTICLE_HEADING.fullmatch(stripped) and (prev_blank or not seen_blank):
            doc = "\n".join(body).strip()
            if doc:
                yield doc
            body = []
        else:
            body.append(_wikitext_clean(stripped))
        prev_blank = False
    doc = "\n".join(body).strip()
    if doc:
        yield doc


def iter_plain_text(text: str, plain_text: str = "file") -> Iterator[str]:
    """Plain text: the whole text as one document (``"file"``) or one per blank-line separated
    paragraph (``"paragraph"``)."""
    if plain_text not in PLAIN_TEXT_MODES:
        raise ValueError(f"plain_text must be one of {PLAIN_TEXT_MODES}, got {plain_text!r}")
    text = text.replace("\r\n", "\n")
    chunks = [text] if plain_text == "file" else _BLANK_LINES.split(text)
    for chunk in chunks:
        doc = chunk.strip()
        if doc:
            yield doc


def detect_format(path: Path) -> str:
    """``"wikiextractor"``, ``"wikitext"`` or ``"plain"`` for a file, from its suffix and first line."""
    with open(path, encoding="utf-8", errors="replace", newline=None) as f:
        head = f.read(_SNIFF_BYTES)
    first = next((ln.strip() for ln in head.splitlines() if ln.strip()), "")
    if first.startswith("<doc ") or first == "<doc>":
        return "wikiextractor"
    if path.suffix in WIKITEXT_SUFFIXES or _ARTICLE_HEADING.fullmatch(first):
        return "wikitext"
    return "plain"


def iter_file_documents(path: Path, plain_text: str = "file") -> Iterator[str]:
    """Documents of one local file, parsed according to ``detect_format``."""
    fmt = detect_format(path)
    with open(path, encoding="utf-8", errors="replace", newline=None) as f:
        if fmt == "wikiextractor":
            yield from iter_wikiextractor(f)
        elif fmt == "wikitext":
            yield from iter_wikitext(f)
        else:
            yield from iter_plain_text(f.read(), plain_text)


def _iter_hub_documents(source: str) -> Iterator[str]:
    ds = _load_hub_dataset(source)
    name = parse_hub_source(source)[0]
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {source!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    texts = (row["text"] for row in ds)
    if name.split("/")[-1].startswith("wikitext"):
        yield from iter_wikitext(texts)
    else:
        for t in texts:
            t = (t or "").strip()
            if t:
                yield t


def _truncate_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` within ``max_bytes`` UTF-8 bytes, cut at whitespace if possible."""
    cut = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    space = max(cut.rfind(" "), cut.rfind("\n"))
    return (cut[:space] if space > 0 else cut).strip()


def iter_documents(
    source: str | os.PathLike[str],
    *,
    max_documents: int | None = None,
    max_bytes: int | None = None,
    plain_text: str = "file",
) -> Iterator[str]:
    """Yield the documents of ``source`` (see the module docstring for formats) in a deterministic order.

    ``max_documents`` stops after that many documents; ``max_bytes`` stops once that many UTF-8
    bytes of document text were yielded (the document crossing the limit is cut at a word
    boundary, so a single novel can be limited too).
    """
    if plain_text not in PLAIN_TEXT_MODES:
        raise ValueError(f"plain_text must be one of {PLAIN_TEXT_MODES}, got {plain_text!r}")
    s = os.fspath(source)
    if is_local_source(s):
        docs: Iterator[str] = (d for f in source_files(s) for d in iter_file_documents(f, plain_text))
    else:
        docs = _iter_hub_documents(s)
    n_docs = 0
    n_bytes = 0
    for doc in docs:
        if max_documents is not None and n_docs >= max_documents:
            return
        if max_bytes is not None:
            size = len(doc.encode("utf-8"))
            if n_bytes + size > max_bytes:
                doc = _truncate_utf8(doc, max_bytes - n_bytes)
                if doc:
                    yield doc
                return
            n_bytes += size
        n_docs += 1
        yield doc
