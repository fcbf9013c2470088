"""Telling a local path from a Hugging Face hub name, for the corpus and the tokenizer alike.

Both `data.corpus` and `data.vocab` accept either a local path or a hub name. A value that exists
on disk is a path; one that does not is a *missing path* (an error naming it) when it looks like
one, else a hub name (`wikitext:wikitext-2-raw-v1`, `bert-base-uncased`, `org/name`).
"""
from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path


def looks_like_path(name: str, suffixes: Collection[str] = ()) -> bool:
    """True when the non-existing `name` is clearly meant as a filesystem path rather than a hub
    name: it starts with `/`, `.` or `~`, ends in one of `suffixes` (file types the caller reads),
    has more than one `/` (a hub name has at most `org/name`), or holds the OS's own separator."""
    return (
        name.startswith(("/", ".", "~"))
        or Path(name).suffix in suffixes
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )
