"""Pre-tokenised, pre-packed, memory-mapped MLM sequences; train/val split; rank-sliced sample order.

Cache layout (``build_token_cache``), all under ``cache_dir``::

    mlm-<key>.bin    the packed sequences: a C-order (num_sequences, max_seq_len) array of token
                     ids (uint16 when every id fits, else int32), memory-mappable; sample i is
                     row i, so reading it is O(1)
    mlm-<key>.json   the index: format version, key, dtype, shape, counts, special ids, the source
                     and tokenizer fingerprints, limits and build statistics. It is written last
                     (temp file + os.replace), so its presence with a matching data size marks a
                     complete cache; a crash mid-build leaves only ``.tmp`` files and no index
    mlm-<key>.lock   fcntl lock file: one process builds, the others wait and then reuse (skipped
                     where the file system has no locks; the trainer's ranks wait at a barrier)

``key`` hashes (format version, source fingerprint, tokenizer fingerprint, max_seq_len, limits).

Packing (precomputed at build time): documents are tokenised without special tokens and
concatenated into one stream with a [SEP] between consecutive documents; the stream is cut into
chunks of ``max_seq_len - 2`` tokens and each chunk becomes ``[CLS] chunk [SEP]``. Every sequence
therefore has exactly ``max_seq_len`` tokens and no padding, except the last one (the leftover
tokens, kept by default), which is padded with [PAD] and masked out by its attention mask. A
separator that would fall on the first slot of a chunk is dropped (the previous sequence's closing
[SEP] already ends that document); one that falls on the last slot gives ``... [SEP] [SEP]``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from tcd_ds.locks import build_lock

from .corpus import describe_source, iter_documents, source_num_bytes
from .tokenizer import SpecialIds, special_ids, tokenizer_fingerprint

FORMAT_VERSION = 1
_PREFIX = "mlm-"


# ------------------------------------------------------------------------------------ tokenising
def _batch_encoder(tokenizer: Any):
    """A function ``list[str] -> list[list[int]]`` tokenising without special tokens, batched."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # slow (pure Python) tokenizer
        return lambda texts: tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                       return_token_type_ids=False)["input_ids"]
    if backend.truncation is not None or backend.padding is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]


def encode_documents(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids (no special tokens) of each text, with the tokenizer's batched fast path.

    The build goes through this module-level function (tests count calls to it).
    """
    return _batch_encoder(tokenizer)(texts)


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id (``< vocab_size``) fits in it, else ``int32``."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


# ----------------------------------------------------------------------------------------- index
@dataclass(frozen=True)
class CacheIndex:
    """The parsed index of a complete token cache."""

    index_path: Path
    data_path: Path
    key: str
    dtype: np.dtype
    max_seq_len: int
    num_sequences: int
    last_length: int
    num_documents: int
    num_tokens: int
    special: SpecialIds
    meta: dict[str, Any]

    def length(self, i: int) -> int:
        """Number of real (non-padding) tokens of sequence ``i``."""
        return self.last_length if i == self.num_sequences - 1 else self.max_seq_len

    def sequences(self) -> np.ndarray:
        """The read-only ``(num_sequences, max_seq_len)`` memory map of the packed sequences."""
        return np.memmap(self.data_path, dtype=self.dtype, mode="r", shape=(self.num_sequences, self.max_seq_len))


def read_index(index_path: str | os.PathLike[str], expect_key: str | None = None) -> CacheIndex:
    """Load and validate a cache index; ``ValueError`` (one line) if missing, partial or corrupt."""
    index_path = Path(index_path)
    try:
        meta = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"token cache index not found: {index_path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupt token cache index {index_path}: {exc}") from None
    try:
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format version {meta.get('format_version')} != {FORMAT_VERSION}")
        if not meta.get("complete"):
            raise ValueError("not marked complete")
        if expect_key is not None and meta.get("key") != expect_key:
            raise ValueError(f"key {meta.get('key')} != expected {expect_key}")
        dtype = np.dtype(meta["dtype"])
        n, length = int(meta["num_sequences"]), int(meta["max_seq_len"])
        data_path = index_path.with_name(meta["data_file"])
        expected = n * length * dtype.itemsize
        size = data_path.stat().st_size if data_path.is_file() else -1
        if size != expected:
            raise ValueError(f"data file {data_path.name} has {size} bytes, expected {expected}")
        sp = meta["special_ids"]
        special = SpecialIds(pad=sp["pad"], cls=sp["cls"], sep=sp["sep"], mask=sp["mask"], unk=sp["unk"],
                             vocab_size=sp["vocab_size"])
        return CacheIndex(index_path=index_path, data_path=data_path, key=meta["key"], dtype=dtype,
                          max_seq_len=length, num_sequences=n, last_length=int(meta["last_length"]),
                          num_documents=int(meta["num_documents"]), num_tokens=int(meta["num_tokens"]),
                          special=special, meta=meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"invalid token cache {index_path}: {exc}") from None


def cache_key(source_fingerprint: str, tokenizer_fp: str, max_seq_len: int, **limits: Any) -> str:
    """The cache key: a hash of format version, source and tokenizer fingerprints, length, limits."""
    payload = {"format_version": FORMAT_VERSION, "source": source_fingerprint, "tokenizer": tokenizer_fp,
               "max_seq_len": max_seq_len, "limits": limits}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------- packing
class _Packer:
    """Streams documents' token ids into ``[CLS] chunk [SEP]`` rows written to a binary file."""

    def __init__(self, out, max_seq_len: int, special: SpecialIds, dtype: np.dtype, max_sequences: int | None):
        self.out = out
        self.length = max_seq_len
        self.chunk = max_seq_len - 2
        self.sp = special
        self.dtype = dtype
        self.max_sequences = max_sequences
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.stream_len = 0  # content tokens (incl. separators) placed so far
        self.rows = 0
        self.num_documents = 0
        self.num_tokens = 0
        self.hasher = hashlib.sha256()

    @property
    def full(self) -> bool:
        return self.max_sequences is not None and self.rows >= self.max_sequences

    def add(self, ids: Sequence[int]) -> None:
        if not len(ids) or self.full:
            return
        if self.num_documents and self.stream_len % self.chunk != 0:
            self.pending.append(np.array([self.sp.sep], dtype=np.int64))
            self.pending_len += 1
            self.stream_len += 1
        arr = np.asarray(ids, dtype=np.int64)
        self.pending.append(arr)
        self.pending_len += len(arr)
        self.stream_len += len(arr)
        self.num_documents += 1
        self.num_tokens += len(arr)
        if self.pending_len >= 256 * self.chunk:
            self._flush_full_rows()

    def _write(self, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        self.hasher.update(data.tobytes())
        data.tofile(self.out)
        self.rows += len(rows)

    def _flush_full_rows(self) -> None:
        if not self.pending_len:
            return
        stream = np.concatenate(self.pending)
        n = len(stream) // self.chunk
        if self.max_sequences is not None:
            n = min(n, self.max_sequences - self.rows)
        if n > 0:
            rows = np.empty((n, self.length), dtype=np.int64)
            rows[:, 0] = self.sp.cls
            rows[:, 1:-1] = stream[: n * self.chunk].reshape(n, self.chunk)
            rows[:, -1] = self.sp.sep
            self._write(rows)
        rest = stream[n * self.chunk:] if not self.full else stream[:0]
        self.pending = [rest]
        self.pending_len = len(rest)

    def finish(self, keep_partial: bool) -> tuple[int, int]:
        """Write remaining rows; returns ``(num_full_sequences, last_length)``."""
        self._flush_full_rows()
        full_rows = self.rows
        last_length = self.length
        if keep_partial and self.pending_len and not self.full and full_rows > 0:
            rest = np.concatenate(self.pending)
            row = np.full((1, self.length), self.sp.pad, dtype=np.int64)
            row[0, 0] = self.sp.cls
            row[0, 1: 1 + len(rest)] = rest
            row[0, 1 + len(rest)] = self.sp.sep
            last_length = len(rest) + 2
            self._write(row)
        return full_rows, last_length


def _fsync_write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=not enabled,
                mininterval=0.5, dynamic_ncols=True)


def _check_limits(max_seq_len: int, **limits: int | None) -> None:
    if max_seq_len < 3:
        raise ValueError(f"max_seq_len must be >= 3 ([CLS] + 1 token + [SEP]), got {max_seq_len}")
    for name, value in limits.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {value}")


def _packed_figures(packer: "_Packer", full_rows: int, last_length: int) -> dict[str, Any]:
    """What the index records of the packed data: rows, documents, tokens and the data's hash."""
    return {"num_sequences": packer.rows, "num_full_sequences": full_rows, "last_length": last_length,
            "num_documents": packer.num_documents, "num_tokens": packer.num_tokens,
            "num_stream_tokens": packer.stream_len, "data_sha256": packer.hasher.hexdigest()}


def build_token_cache(
    source: str | os.PathLike[str],
    tokenizer: Any,
    cache_dir: str | os.PathLike[str],
    max_seq_len: int,
    *,
    max_documents: int | None = None,
    max_bytes: int | None = None,
    max_sequences: int | None = None,
    plain_text: str = "file",
    keep_partial: bool = True,
    batch_documents: int = 64,
    progress: bool = True,
) -> Path:
    """Tokenise and pack ``source`` once into a memory-mapped cache; return the index path.

    A complete cache with the same key is reused without reading the corpus. Several processes
    (ranks) may call this at once: one builds under a file lock, the others wait and reuse (the
    trainer does not rely on the lock: its ranks call this through ``tcd_ds.dist.one_rank_first``).
    ``max_documents``/``max_bytes`` limit the documents read (see ``iter_documents``),
    ``max_sequences`` stops after that many full sequences (no partial one then) - for quick
    tests and small eval sets. Raises ``ValueError`` if the corpus cannot fill one sequence.
    """
    _check_limits(max_seq_len, max_documents=max_documents, max_bytes=max_bytes, max_sequences=max_sequences)
    sp = special_ids(tokenizer)
    dtype = token_dtype(sp.vocab_size)
    src = os.fspath(source)
    source_fp = describe_source(src)
    tok_fp = tokenizer_fingerprint(tokenizer)
    limits = {"max_documents": max_documents, "max_bytes": max_bytes, "max_sequences": max_sequences,
              "plain_text": plain_text, "keep_partial": keep_partial}
    key = cache_key(source_fp, tok_fp, max_seq_len, **limits)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    index_path = cache_dir / f"{_PREFIX}{key}.json"
    data_path = cache_dir / f"{_PREFIX}{key}.bin"

    with contextlib.suppress(ValueError):
        read_index(index_path, expect_key=key)
        return index_path
    with build_lock(cache_dir / f"{_PREFIX}{key}.lock"):
        with contextlib.suppress(ValueError):  # built by another process while we waited
            read_index(index_path, expect_key=key)
            return index_path
        index_path.unlink(missing_ok=True)  # an invalid index must never describe the new data
        tmp = data_path.with_name(f".{data_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            t0 = time.perf_counter()
            with open(tmp, "wb") as out:
                packer = _Packer(out, max_seq_len, sp, dtype, max_sequences)
                full_rows, last_length = _tokenize_into(packer, src, tokenizer, max_documents, max_bytes,
                                                        plain_text, keep_partial, batch_documents, progress)
                out.flush()
                os.fsync(out.fileno())
            seconds = time.perf_counter() - t0
            if full_rows == 0:
                what = "is empty (no documents)" if packer.num_documents == 0 else "is too short"
                raise ValueError(
                    f"corpus {src!r} {what}: found {packer.num_tokens} tokens in {packer.num_documents} documents, "
                    f"need at least {max_seq_len - 2} to fill one sequence of max_seq_len={max_seq_len}"
                )
            os.replace(tmp, data_path)
            meta = {"format_version": FORMAT_VERSION, "key": key, "complete": True, "data_file": data_path.name,
                    "dtype": dtype.name, "max_seq_len": max_seq_len, **_packed_figures(packer, full_rows, last_length),
                    "special_ids": {"pad": sp.pad, "cls": sp.cls, "sep": sp.sep, "mask": sp.mask, "unk": sp.unk,
                                    "vocab_size": sp.vocab_size},
                    "source": src, "source_fingerprint": source_fp, "tokenizer_fingerprint": tok_fp,
                    "tokenizer_class": type(tokenizer).__name__, "limits": limits,
                    "build_seconds": round(seconds, 3),
                    "tokens_per_second": round(packer.num_tokens / seconds, 1) if seconds > 0 else None,
                    "created_unix": time.time()}
            _fsync_write_json(index_path, meta)
        finally:
            tmp.unlink(missing_ok=True)
    read_index(index_path, expect_key=key)
    return index_path


def _tokenize_into(packer: _Packer, src: str, tokenizer: Any, max_documents: int | None, max_bytes: int | None,
                   plain_text: str, keep_partial: bool, batch_documents: int, progress: bool) -> tuple[int, int]:
    """Read, tokenise (batched) and pack every document of ``src``; returns ``packer.finish``."""
    total = source_num_bytes(src)
    if max_bytes is not None:
        total = min(total, max_bytes) if total is not None else max_bytes
    docs = iter_documents(src, max_documents=max_documents, max_bytes=max_bytes, plain_text=plain_text)
    batch: list[str] = []
    batch_chars = 0
    with _progress(total, f"tokenizing {Path(src).name or src}", progress) as bar:
        def run_batch() -> None:
            for ids in encode_documents(tokenizer, batch):
                packer.add(ids)
            bar.update(sum(len(t.encode("utf-8")) for t in batch))
            bar.set_postfix(docs=packer.num_documents, tokens=packer.num_tokens, seqs=packer.rows, refresh=False)

        for doc in docs:
            batch.append(doc)
            batch_chars += len(doc)
            if len(batch) >= batch_documents or batch_chars >= (1 << 22):
                run_batch()
                batch, batch_chars = [], 0
                if packer.full:
                    break
        if batch and not packer.full:
            run_batch()
        result = packer.finish(keep_partial)
        if bar.total is not None and bar.n < bar.total:
            bar.update(bar.total - bar.n)  # document text excludes markup, so the count falls short
        bar.set_postfix(docs=packer.num_documents, tokens=packer.num_tokens, seqs=packer.rows)
        return result


# --------------------------------------------------------------------------------------- dataset
class PackedDataset(Dataset):
    """Packed MLM sequences of a token cache (optionally a subset of its rows).

    ``dataset[i]`` is a dict of LongTensors ``input_ids``, ``attention_mask`` (1 on real tokens,
    0 on the padding of the last sequence) and ``token_type_ids`` (zeros), each ``(max_seq_len,)``.
    The memory map is opened lazily per process, so the dataset pickles cheaply to DataLoader workers.
    """

    def __init__(self, index_path: str | os.PathLike[str] | CacheIndex, indices: Sequence[int] | np.ndarray | None = None):
        self.index = index_path if isinstance(index_path, CacheIndex) else read_index(index_path)
        n = self.index.num_sequences
        self.indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1 or (len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= n)):
            raise ValueError(f"indices must be a 1-D array of row numbers in [0, {n})")
        self._rows: np.ndarray | None = None

    @property
    def max_seq_len(self) -> int:
        return self.index.max_seq_len

    @property
    def special(self) -> SpecialIds:
        return self.index.special

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_rows"] = None
        return state

    def _table(self) -> np.ndarray:
        if self._rows is None:
            self._rows = self.index.sequences()
        return self._rows

    def get_batch(self, items: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Samples ``items`` (positions in this dataset) as ``(len(items), max_seq_len)`` LongTensors."""
        items = np.asarray(items, dtype=np.int64)
        rows = self.indices[items]
        ids = torch.from_numpy(self._table()[rows].astype(np.int64))
        lengths = torch.full((len(rows),), self.index.max_seq_len, dtype=torch.long)
        lengths[torch.from_numpy(rows == self.index.num_sequences - 1)] = self.index.last_length
        mask = (torch.arange(self.index.max_seq_len)[None, :] < lengths[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} sequences")
        return {k: v[0] for k, v in self.get_batch([i % len(self)]).items()}


def split_train_val(index_path: str | os.PathLike[str] | CacheIndex, val_fraction: float = 0.01
                    ) -> tuple[PackedDataset, PackedDataset]:
    """Deterministic hold-out: the last ``ceil(val_fraction * n)`` sequences are validation.

    A contiguous tail (rather than every k-th row) keeps consecutive chunks of one article on the
    same side, so at most one document straddles the split. Independent of any seed.
    """
    index = index_path if isinstance(index_path, CacheIndex) else read_index(index_path)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = index.num_sequences
    n_val = math.ceil(n * val_fraction) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise ValueError(f"cache {index.index_path.name} has {n} sequences: too few to hold out {val_fraction:.1%} "
                         f"for validation and keep a training sequence")
    return PackedDataset(index, np.arange(n - n_val)), PackedDataset(index, np.arange(n - n_val, n))


# ----------------------------------------------------------------------------------- sample order
class SampleOrder:
    """Deterministic, resumable global sample order, sliced per rank and micro-step.

    Epoch ``e`` visits ``permutation(e)``, a permutation of ``range(num_samples)`` drawn from a numpy
    Generator seeded with ``SeedSequence([seed, e])`` (a pure function of seed and epoch). Each
    optimizer step consumes ``global_batch = world_size * micro_batch * grad_accum`` samples; an
    epoch has ``num_samples // global_batch`` steps (the remainder of each epoch's permutation is
    skipped, a different remainder each epoch), and epochs roll over automatically. Within step
    ``s`` the samples at permutation positions ``[s' * G, (s' + 1) * G)`` (``s'`` the step within its
    epoch) are laid out as ``[micro_step][rank][micro_batch]``, so all slices of a step are disjoint
    and a run resumed at step k sees exactly what an uninterrupted run sees from step k on.
    """

    def __init__(self, num_samples: int, seed: int, world_size: int = 1, micro_batch: int = 1, grad_accum: int = 1):
        for name, v in (("num_samples", num_samples), ("world_size", world_size), ("micro_batch", micro_batch),
                        ("grad_accum", grad_accum)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.world_size = int(world_size)
        self.micro_batch = int(micro_batch)
        self.grad_accum = int(grad_accum)
        self.global_batch = self.world_size * self.micro_batch * self.grad_accum
        if self.global_batch > self.num_samples:
            raise ValueError(f"dataset has {self.num_samples} samples, fewer than one global batch of "
                             f"{self.global_batch} (world_size {world_size} x micro_batch {micro_batch} x grad_accum {grad_accum})")
        self.steps_per_epoch = self.num_samples // self.global_batch
        self._cached: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (cached for the most recent epoch)."""
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch)])))
            self._cached = (epoch, rng.permutation(self.num_samples))
        return self._cached[1]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def step_indices(self, step: int) -> np.ndarray:
        """All sample indices of global ``step``, shaped ``(grad_accum, world_size, micro_batch)``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        start = in_epoch * self.global_batch
        block = self.permutation(epoch)[start: start + self.global_batch]
        return block.reshape(self.grad_accum, self.world_size, self.micro_batch)

    def batch_indices(self, step: int, micro_step: int, rank: int) -> np.ndarray:
        """The ``micro_batch`` sample indices that ``rank`` uses at ``micro_step`` of ``step``."""
        if not 0 <= micro_step < self.grad_accum:
            raise ValueError(f"micro_step must be in [0, {self.grad_accum}), got {micro_step}")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return self.step_indices(step)[micro_step, rank].copy()

    def iter_rank(self, rank: int, start_step: int = 0, num_steps: int | None = None
                  ) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(step, micro_step, indices)`` for ``rank`` from ``start_step`` (forever if ``num_steps`` is None)."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            for micro in range(self.grad_accum):
                yield step, micro, self.batch_indices(step, micro, rank)
            step += 1


class RankBatchSampler(Sampler[list[int]]):
    """A DataLoader ``batch_sampler`` yielding one rank's micro-batches of a ``SampleOrder``.

    Yields ``num_steps * grad_accum`` lists (or forever when ``num_steps`` is None) from ``start_step``.
    """

    def __init__(self, order: SampleOrder, rank: int, start_step: int = 0, num_steps: int | None = None):
        self.order, self.rank, self.start_step, self.num_steps = order, rank, start_step, num_steps

    def __iter__(self) -> Iterator[list[int]]:
        for _, _, idx in self.order.iter_rank(self.rank, self.start_step, self.num_steps):
            yield idx.tolist()

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless RankBatchSampler has no length")
        return self.num_steps * self.order.grad_accum
