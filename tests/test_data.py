"""Tests of the pre-training data pipeline: tokenizer, corpus readers, token cache, order, MLM."""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tcd_ds.data import shards
from tcd_ds.data.corpus import describe_source, iter_documents, iter_wikiextractor, iter_wikitext
from tcd_ds.data.mlm import IGNORE_INDEX, MLMCollator, mask_tokens, mlm_generator, random_token_pool
from tcd_ds.data.shards import (PackedDataset, RankBatchSampler, SampleOrder, build_token_cache, read_index,
                                split_train_val, token_dtype)
from tcd_ds.data.tokenizer import (SpecialIds, load_tokenizer, read_vocab, special_ids, tokenizer_fingerprint)

CLS, SEP, PAD, MASK, UNK = 101, 102, 0, 103, 100
WORDS = {w: i for w, i in zip("one two three four five six seven eight nine ten".split(),
                              [2028, 2048, 2093, 2176, 2274, 2416, 2698, 2809, 3157, 2702])}


@pytest.fixture(scope="module")
def tok(vocab_file: Path):
    return load_tokenizer(str(vocab_file))


def ids_of(text: str) -> list[int]:
    return [WORDS[w] for w in text.split()]


def write_paragraphs(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


class EncodeCounter:
    """Wraps shards.encode_documents, counting calls (monkeypatched in)."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, tokenizer, texts):
        self.calls += 1
        return self.real(tokenizer, texts)


@pytest.fixture()
def encode_counter(monkeypatch) -> EncodeCounter:
    counter = EncodeCounter(shards.encode_documents)
    monkeypatch.setattr(shards, "encode_documents", counter)
    return counter


# ------------------------------------------------------------------------------------- tokenizer
def test_real_vocab_known_ids(tok):
    assert tok("hello world")["input_ids"] == [CLS, 7592, 2088, SEP]
    assert tok("Hello WORLD", add_special_tokens=False)["input_ids"] == [7592, 2088]  # lowercased
    sp = special_ids(tok)
    assert sp == SpecialIds(pad=0, cls=101, sep=102, mask=103, unk=100, vocab_size=30522)
    assert sp.all == (0, 100, 101, 102, 103)


def test_load_from_directory_and_fingerprint(tmp_path, vocab_file, tok):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").symlink_to(vocab_file)
    tok_dir = load_tokenizer(str(tmp_path / "tok"))
    assert len(tok_dir) == 30522
    fp = tokenizer_fingerprint(tok)
    assert len(fp) == 64 and fp == tokenizer_fingerprint(tok_dir) == tokenizer_fingerprint(load_tokenizer(vocab_file))
    assert tokenizer_fingerprint(load_tokenizer(vocab_file, do_lower_case=False)) != fp
    lines = vocab_file.read_text(encoding="utf-8").splitlines()
    lines[2000], lines[2001] = lines[2001], lines[2000]
    (tmp_path / "swapped.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "swapped.txt")) != fp


def test_bad_vocab_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_tokenizer(str(tmp_path / "missing.txt"))
    (tmp_path / "novocab").mkdir()
    with pytest.raises(FileNotFoundError, match="has no vocab.txt"):
        load_tokenizer(str(tmp_path / "novocab"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt: it is empty"):
        load_tokenizer(str(tmp_path / "empty.txt"))
    (tmp_path / "nomask.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(ValueError, match=r"nomask\.txt: missing special tokens \[MASK\]"):
        load_tokenizer(str(tmp_path / "nomask.txt"))
    (tmp_path / "dup.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\na\n")
    with pytest.raises(ValueError, match="appears twice"):
        read_vocab(tmp_path / "dup.txt")


def test_hub_tokenizer_failure_is_one_clear_line(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(OSError) as info:
        load_tokenizer("some-org/some-bert")
    msg = str(info.value)
    assert "\n" not in msg and "'some-org/some-bert'" in msg and "hub is unreachable" in msg


def test_missing_paths_and_hub_names_are_told_apart_alike_for_corpus_and_vocab(tmp_path):
    from tcd_ds.data.corpus import is_local_source
    from tcd_ds.data.paths import looks_like_path
    from tcd_ds.data.tokenizer import resolve_vocab_path

    for name in ("/abs/x", "./x", "../x", "~/x", ".cache/x", "a/b/c"):
        assert looks_like_path(name)
        with pytest.raises(FileNotFoundError, match="corpus source not found"):
            is_local_source(name)
        with pytest.raises(FileNotFoundError, match="tokenizer vocab file not found"):
            resolve_vocab_path(name)
    for name in ("bert-base-uncased", "org/name", "wikitext:wikitext-2-raw-v1"):
        assert not looks_like_path(name, (".txt", ".raw"))
        assert is_local_source(name) is False and resolve_vocab_path(name) is None
    assert looks_like_path("vocab.txt", (".txt",)) and not looks_like_path("vocab.txt")
    with pytest.raises(FileNotFoundError):
        is_local_source("wiki.test.raw")  # a file type the corpus reads
    with pytest.raises(FileNotFoundError):
        resolve_vocab_path("my-vocab.txt")


# ---------------------------------------------------------------------------------------- corpus
def test_wikiextractor_synthetic(tmp_path):
    text = ('<doc id="1" url="u1" title="First">\nFirst\n\nBody one.\nMore one.\n</doc>\n'
            '<doc id="2" url="u2" title="Empty">\nEmpty\n\n</doc>\n'
            '<doc id="3" url="u3" title="Third">\nThird\n\nBody three.\n</doc>\n')
    (tmp_path / "wiki_00").write_text(text)
    assert list(iter_documents(tmp_path)) == ["Body one.\nMore one.", "Body three."]
    assert list(iter_wikiextractor(text.splitlines(True))) == ["Body one.\nMore one.", "Body three."]


def test_wikiextractor_real(shared_data):
    f = shared_data / "wikipedia-en-2015" / "AA" / "wiki_00"
    docs = list(iter_documents(f))
    n_tags = sum(1 for line in f.open(encoding="utf-8") if line.startswith("<doc "))
    assert len(docs) == n_tags == 38
    assert docs[0].startswith("Anarchism is a political philosophy")
    assert docs[1].startswith("Autism is a neurodevelopmental disorder")
    assert not any("<doc" in d or "</doc>" in d for d in docs)
    # the directory reads AA/wiki_00 then AA/wiki_01 ...; limits apply across files
    first40 = list(iter_documents(shared_data / "wikipedia-en-2015", max_documents=40))
    assert first40[:38] == docs and len(first40) == 40
    assert first40[38] == next(iter_documents(shared_data / "wikipedia-en-2015" / "AA" / "wiki_01"))
    limited = list(iter_documents(f, max_bytes=100_000))
    assert 0 < sum(len(d.encode()) for d in limited) <= 100_000


def test_wikitext_real(shared_data):
    valid = list(iter_documents(shared_data / "wikitext-2" / "wiki.valid.tokens"))
    assert len(valid) == 60  # one per " = Title = " article heading
    assert valid[0].startswith("Homarus gammarus , known as the European lobster")
    assert all("@-@" not in d and "<unk>" not in d and not d.startswith("=") for d in valid)
    raw = list(iter_documents(shared_data / "wikitext-2" / "wiki.test.raw"))  # CRLF, blank lines dropped
    assert raw[0].startswith("Robert Boulter is an English film , television and theatre actor")
    assert not any("\r" in d for d in raw) and len(raw) >= 60
    # a directory of .raw/.tokens files reads them in sorted order
    assert next(iter_documents(shared_data / "wikitext-2")) == raw[0]


def test_wikitext_synthetic_headings():
    lines = [" \n", " = Alpha = \n", " \n", " a @-@ b @,@ c <unk> \n", " = = Sec = = \n", " x = 1 y = \n",
             " = not a title = \n", " \n", " = Beta = \n", " \n", " u \n"]
    assert list(iter_wikitext(lines)) == ["a-b,c [UNK]\nSec\nx = 1 y =\n= not a title =", "u"]


def test_gutenberg_and_plain_text(shared_data, tmp_path):
    gut = shared_data / "gutenberg-novels"
    novels = list(iter_documents(gut))
    assert len(novels) == 7  # one document per novel, sorted by file name
    assert novels[0].startswith("[Emma by Jane Austen 1816]") and novels[-1].startswith("[Moby Dick")
    small = list(iter_documents(gut, max_bytes=5000))
    assert len(small) == 1 and 4000 < len(small[0].encode()) <= 5000 and novels[0].startswith(small[0])
    paras = list(iter_documents(gut / "austen-emma.txt", plain_text="paragraph"))
    assert len(paras) > 1000 and paras[0] == "[Emma by Jane Austen 1816]" and paras[1] == "VOLUME I"
    f = write_paragraphs(tmp_path / "p.txt", ["a b", "c\nd", "", "e"])
    assert list(iter_documents(f, plain_text="paragraph")) == ["a b", "c\nd", "e"]
    assert list(iter_documents(f)) == ["a b\n\nc\nd\n\n\n\ne"]


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus source not found"):
        list(iter_documents(str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="corpus source not found"):
        describe_source("./does/not/exist.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="holds no text files"):
        list(iter_documents(tmp_path / "empty_dir"))


def test_hub_dataset_paths(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(OSError) as info:
        list(iter_documents("wikitext:wikitext-2-raw-v1"))
    msg = str(info.value)
    assert "\n" not in msg and "'wikitext:wikitext-2-raw-v1'" in msg and "config=wikitext-2-raw-v1" in msg

    calls = []

    def fake(name, config, split):
        calls.append((name, config, split))
        if name == "wikitext":
            rows = ["", " = A = \n", "", " a @-@ b \n", "", " = B = \n", "", " c \n"]
        else:
            rows = ["article one", "", "article two"]
        return datasets.Dataset.from_dict({"text": rows})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert list(iter_documents("wikitext:wikitext-2-raw-v1")) == ["a-b", "c"]
    assert list(iter_documents("wikipedia:20220301.en:validation")) == ["article one", "article two"]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train"), ("wikipedia", "20220301.en", "validation")]
    assert describe_source("wikipedia:20220301.en") == describe_source("wikipedia:20220301.en")


def test_describe_source_tracks_changes(tmp_path):
    f = write_paragraphs(tmp_path / "c.txt", ["one two"])
    fp = describe_source(f)
    assert fp == describe_source(str(f)) and len(fp) == 64
    time.sleep(0.01)
    f.write_text("one two three\n")
    assert describe_source(f) != fp
    assert describe_source(tmp_path) != describe_source(f)


# ---------------------------------------------------------------------------------------- shards
def test_packing_layout_exact(tmp_path, tok):
    src = write_paragraphs(tmp_path / "c.txt", ["one two three four", "five six seven",
                                                "eight nine ten one two three four five"])
    idx = build_token_cache(src, tok, tmp_path / "cache", 8, plain_text="paragraph", progress=False)
    index = read_index(idx)
    rows = index.sequences()
    expected = [
        [CLS] + ids_of("one two three four") + [SEP] + ids_of("five") + [SEP],
        [CLS] + ids_of("six seven") + [SEP] + ids_of("eight nine ten") + [SEP],
        [CLS] + ids_of("one two three four five") + [SEP, PAD],
    ]
    assert rows.tolist() == expected and rows.dtype == np.uint16
    assert (index.num_sequences, index.last_length, index.num_documents, index.num_tokens) == (3, 7, 3, 15)
    ds = PackedDataset(idx)
    last = ds[2]
    assert last["attention_mask"].tolist() == [1] * 7 + [0]
    assert ds[0]["attention_mask"].tolist() == [1] * 8
    assert all(v.dtype == torch.long and v.shape == (8,) for v in last.values())
    assert last["token_type_ids"].sum() == 0 and ds[-1]["input_ids"].tolist() == expected[2]
    batch = ds.get_batch([0, 2])
    assert torch.equal(batch["input_ids"], torch.stack([ds[0]["input_ids"], ds[2]["input_ids"]]))


def test_separator_not_at_sequence_start(tmp_path, tok):
    # doc 1 fills a chunk of max_seq_len - 2 = 4 exactly: the next row starts with doc 2, not [SEP]
    src = write_paragraphs(tmp_path / "c.txt", ["one two three four", "five six seven eight nine"])
    idx = build_token_cache(src, tok, tmp_path / "cache", 6, plain_text="paragraph", keep_partial=False,
                            progress=False)
    assert read_index(idx).sequences().tolist() == [[CLS] + ids_of("one two three four") + [SEP],
                                                    [CLS] + ids_of("five six seven eight") + [SEP]]
    limited = build_token_cache(src, tok, tmp_path / "cache", 6, plain_text="paragraph", max_sequences=1,
                                progress=False)
    assert limited != idx and read_index(limited).num_sequences == 1


def test_cache_reused_without_retokenizing(tmp_path, tok, encode_counter):
    src = write_paragraphs(tmp_path / "c.txt", [" ".join(WORDS)] * 20)
    idx = build_token_cache(src, tok, tmp_path / "cache", 16, plain_text="paragraph", progress=False)
    assert encode_counter.calls > 0
    calls, data = encode_counter.calls, read_index(idx).data_path
    mtimes = (idx.stat().st_mtime_ns, data.stat().st_mtime_ns)
    assert build_token_cache(src, tok, tmp_path / "cache", 16, plain_text="paragraph", progress=False) == idx
    assert encode_counter.calls == calls
    assert (idx.stat().st_mtime_ns, data.stat().st_mtime_ns) == mtimes
    # anything in the key changes the cache: length, limits, the source itself
    other = build_token_cache(src, tok, tmp_path / "cache", 32, plain_text="paragraph", progress=False)
    assert other != idx and encode_counter.calls > calls
    time.sleep(0.01)
    write_paragraphs(src, [" ".join(WORDS)] * 21)
    assert build_token_cache(src, tok, tmp_path / "cache", 16, plain_text="paragraph", progress=False) != idx
    assert not list((tmp_path / "cache").glob(".*tmp*"))


@pytest.mark.parametrize("damage", ["truncate_bin", "delete_bin", "garbage_index", "incomplete_index",
                                    "old_version"])
def test_corrupt_cache_is_rebuilt(tmp_path, tok, encode_counter, damage):
    src = write_paragraphs(tmp_path / "c.txt", [" ".join(WORDS)] * 20)
    idx = build_token_cache(src, tok, tmp_path / "cache", 16, plain_text="paragraph", progress=False)
    good = read_index(idx).sequences().copy()
    data = read_index(idx).data_path
    meta = json.loads(idx.read_text())
    if damage == "truncate_bin":
        data.write_bytes(data.read_bytes()[:-10])
    elif damage == "delete_bin":
        data.unlink()
    elif damage == "garbage_index":
        idx.write_text('{"format_version": 1, "compl')
    elif damage == "incomplete_index":
        idx.write_text(json.dumps({**meta, "complete": False}))
    else:
        idx.write_text(json.dumps({**meta, "format_version": 0}))
    with pytest.raises(ValueError):
        read_index(idx)
    calls = encode_counter.calls
    assert build_token_cache(src, tok, tmp_path / "cache", 16, plain_text="paragraph", progress=False) == idx
    assert encode_counter.calls > calls
    assert np.array_equal(read_index(idx).sequences(), good)


def test_crash_mid_build_leaves_no_cache(tmp_path, tok, monkeypatch):
    src = write_paragraphs(tmp_path / "c.txt", [" ".join(WORDS)] * 50)
    real = shards.encode_documents
    state = {"n": 0}

    def crash_on_second(tokenizer, texts):
        state["n"] += 1
        if state["n"] == 2:
            raise KeyboardInterrupt("killed mid-build")
        return real(tokenizer, texts)

    monkeypatch.setattr(shards, "encode_documents", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(src, tok, tmp_path / "cache", 16, plain_text="paragraph", batch_documents=10,
                          progress=False)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".lock"]  # no index, no data, no tmp
    monkeypatch.setattr(shards, "encode_documents", real)
    idx = build_token_cache(src, tok, tmp_path / "cache", 16, plain_text="paragraph", batch_documents=10,
                            progress=False)
    assert read_index(idx).num_tokens == 500


def test_short_and_empty_corpus_errors(tmp_path, tok):
    short = write_paragraphs(tmp_path / "short.txt", ["one two three"])
    with pytest.raises(ValueError, match=r"short\.txt' is too short: found 3 tokens in 1 documents, need at least 14"):
        build_token_cache(short, tok, tmp_path / "cache", 16, progress=False)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match=r"empty\.txt' is empty \(no documents\): found 0 tokens"):
        build_token_cache(tmp_path / "empty.txt", tok, tmp_path / "cache", 16, progress=False)
    assert not list((tmp_path / "cache").glob("*.json"))


def _concurrent_build(args):
    src, cache, log = args
    from tcd_ds.data.tokenizer import load_tokenizer as load

    vocab, = [p for p in Path(src).parent.glob("vocab.txt")]
    tokenizer = load(str(vocab))
    real = shards.encode_documents

    def slow(tokenizer_, texts):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.1)
        return real(tokenizer_, texts)

    shards.encode_documents = slow
    return str(build_token_cache(src, tokenizer, cache, 16, plain_text="paragraph", batch_documents=4,
                                 progress=False))


@pytest.mark.multiproc
def test_concurrent_ranks_build_once(tmp_path, vocab_file):
    (tmp_path / "vocab.txt").symlink_to(vocab_file)
    src = write_paragraphs(tmp_path / "c.txt", [" ".join(WORDS)] * 16)
    log = tmp_path / "encode.log"
    with mp.get_context("fork").Pool(3) as pool:
        paths = pool.map(_concurrent_build, [(str(src), str(tmp_path / "cache"), str(log))] * 3)
    assert len(set(paths)) == 1
    pids = log.read_text().split()
    assert len(pids) == 4 and len(set(pids)) == 1  # 16 docs / 4 per batch, all by one process
    assert read_index(paths[0]).num_tokens == 160


def test_real_wikipedia_cache(shared_data, tok, tmp_path):
    idx = build_token_cache(shared_data / "wikipedia-en-2015", tok, tmp_path / "cache", 128, max_bytes=2_000_000,
                            progress=False)
    index = read_index(idx)
    meta = index.meta
    rows = index.sequences()
    assert index.dtype == np.uint16 and rows.shape == (index.num_sequences, 128)
    assert index.num_documents >= 38 and index.num_tokens > 300_000
    full = rows[:-1]
    assert (full[:, 0] == CLS).all() and (full[:, -1] == SEP).all() and not (full == PAD).any()
    assert not (full[:, 1] == SEP).any()  # never [CLS] [SEP]
    assert tok.decode(rows[0, :12].tolist()).startswith("[CLS] anarchism is a political philosophy that advocates")
    assert (rows[:, 1:-1] == SEP).sum() >= index.num_documents - 2  # document separators
    print(f"\nwikipedia cache: {meta['num_tokens']} tokens, {meta['num_documents']} docs, "
          f"{meta['build_seconds']} s, {meta['tokens_per_second']:.0f} tokens/s")
    train, val = split_train_val(idx, val_fraction=0.02)
    n = index.num_sequences
    assert len(val) == math.ceil(0.02 * n) and len(train) + len(val) == n
    assert set(train.indices).isdisjoint(val.indices) and val.indices[-1] == n - 1
    again_train, again_val = split_train_val(idx, val_fraction=0.02)
    assert np.array_equal(again_val.indices, val.indices)


@pytest.mark.slow
def test_eval_corpora_small_caches(shared_data, tok, tmp_path):
    for src in (shared_data / "wikitext-2" / "wiki.valid.tokens", shared_data / "gutenberg-novels"):
        idx = build_token_cache(src, tok, tmp_path / "cache", 128, max_sequences=50, progress=False)
        index = read_index(idx)
        assert index.num_sequences == 50 and index.last_length == 128
        assert (index.sequences()[:, 0] == CLS).all()
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_split_edge_cases(tmp_path, tok):
    src = write_paragraphs(tmp_path / "c.txt", [" ".join(WORDS)] * 10)
    idx = build_token_cache(src, tok, tmp_path / "cache", 12, plain_text="paragraph", progress=False)
    n = read_index(idx).num_sequences
    train, val = split_train_val(idx, 0.0)
    assert len(train) == n and len(val) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(idx, 1.0)


def test_token_dtype_and_int32_cache(tmp_path):
    assert token_dtype(30522) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    words = [f"w{i}" for i in range(70_000)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    big = load_tokenizer(str(tmp_path))
    src = write_paragraphs(tmp_path / "c.txt", ["w69999 w1 w70000 w5"] * 3)
    idx = build_token_cache(src, big, tmp_path / "cache", 6, plain_text="paragraph", progress=False)
    index = read_index(idx)
    assert index.dtype == np.int32
    assert index.sequences()[0].tolist() == [2, 70004, 6, 1, 10, 3]  # w70000 is unknown -> [UNK]=1


# ---------------------------------------------------------------------------------- sample order
def test_sample_order_disjoint_and_epochs():
    order = SampleOrder(num_samples=1000, seed=7, world_size=4, micro_batch=8, grad_accum=2)
    assert order.global_batch == 64 and order.steps_per_epoch == 15
    seen = []
    for step in range(order.steps_per_epoch):
        block = np.stack([order.batch_indices(step, m, r) for m in range(2) for r in range(4)])
        assert block.shape == (8, 8) and len(np.unique(block)) == 64  # disjoint across ranks/micro-steps
        assert np.array_equal(block.reshape(2, 4, 8), order.step_indices(step))
        seen.append(block.ravel())
    seen = np.concatenate(seen)
    assert len(np.unique(seen)) == len(seen) == 960  # no sample twice within an epoch
    assert np.array_equal(seen, order.permutation(0)[:960])
    nxt = order.batch_indices(order.steps_per_epoch, 0, 0)  # rolls over to epoch 1
    assert order.epoch_of(order.steps_per_epoch) == 1 and np.array_equal(nxt, order.permutation(1)[:8])
    assert not np.array_equal(order.permutation(0), order.permutation(1))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        SampleOrder(num_samples=10, seed=0, world_size=4, micro_batch=4)


def test_sample_order_resume_and_seeds():
    def run(seed, start, steps, rank):
        order = SampleOrder(num_samples=300, seed=seed, world_size=2, micro_batch=4, grad_accum=3)
        return [(s, m, idx.tolist()) for s, m, idx in order.iter_rank(rank, start, steps)]

    n = 40  # crosses several epochs (12 steps per epoch)
    for rank in (0, 1):
        full = run(3, 0, n, rank)
        resumed = run(3, 0, n // 2, rank) + run(3, n // 2, n - n // 2, rank)
        assert full == resumed and len(full) == n * 3
    assert run(3, 0, 5, 0) != run(4, 0, 5, 0)
    r0, r1 = run(3, 0, 5, 0), run(3, 0, 5, 1)
    assert all(set(a[2]).isdisjoint(b[2]) for a, b in zip(r0, r1))


def test_rank_batch_sampler_with_dataloader(tmp_path, tok):
    src = write_paragraphs(tmp_path / "c.txt", [" ".join(WORDS)] * 40)
    ds = PackedDataset(build_token_cache(src, tok, tmp_path / "cache", 12, plain_text="paragraph", progress=False))
    order = SampleOrder(len(ds), seed=1, world_size=2, micro_batch=3, grad_accum=2)
    sampler = RankBatchSampler(order, rank=1, start_step=2, num_steps=3)
    collator = MLMCollator.from_special(ds.special, seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collator)
    batches = list(loader)
    assert len(batches) == len(sampler) == 6
    assert batches[0]["input_ids"].shape == (3, 12) and set(batches[0]) == {
        "input_ids", "attention_mask", "token_type_ids", "labels"}
    expect = ds.get_batch(order.batch_indices(2, 0, 1))["input_ids"]
    sel = batches[0]["labels"] != IGNORE_INDEX
    assert torch.equal(batches[0]["labels"][sel], expect[sel])
    assert torch.equal(batches[0]["input_ids"][~sel], expect[~sel])


# ------------------------------------------------------------------------------------------- mlm
def _synthetic_batch(batch=512, length=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(999, 30522, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[:, length // 3] = SEP  # a document separator inside the sequence
    ids[:, length // 3 + 5] = UNK
    attn = torch.ones_like(ids)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    lengths[: batch // 2] = length
    pad = torch.arange(length)[None] >= lengths[:, None]
    ids[pad], attn[pad] = PAD, 0
    return ids, attn


def test_mlm_statistics():
    sp = SpecialIds(pad=0, cls=101, sep=102, mask=103, unk=100, vocab_size=30522)
    ids, attn = _synthetic_batch()
    original = ids.clone()
    masked, labels = mask_tokens(ids, attn, sp, 30522, torch.Generator().manual_seed(123))
    assert torch.equal(ids, original)  # input untouched
    candidates = attn.bool() & ~torch.isin(ids, torch.tensor(sp.all))
    sel = labels != IGNORE_INDEX
    n_cand, n_sel = int(candidates.sum()), int(sel.sum())
    assert not (sel & ~candidates).any()  # specials and padding never selected
    assert torch.equal(masked[~sel], ids[~sel]) and torch.equal(labels[sel], ids[sel])
    p = 0.15
    assert abs(n_sel / n_cand - p) < 4 * math.sqrt(p * (1 - p) / n_cand)
    n_mask = int((masked[sel] == MASK).sum())
    n_keep = int((masked[sel] == ids[sel]).sum())
    n_rand = n_sel - n_mask - n_keep
    for count, q in ((n_mask, 0.8), (n_rand, 0.1), (n_keep, 0.1)):
        assert abs(count / n_sel - q) < 4 * math.sqrt(q * (1 - q) / n_sel), (count, q)
    replaced = masked[sel & (masked != MASK) & (masked != ids)]
    assert not torch.isin(replaced, torch.tensor(sp.all)).any() and replaced.max() < 30522
    assert len(torch.unique(replaced)) > 0.9 * len(replaced)  # spread over the vocabulary
    assert (sel.sum(dim=1) >= 1).all()


def test_mlm_determinism_and_minimum_one():
    ids, attn = _synthetic_batch(batch=64, length=32, seed=1)
    special = [0, 100, 101, 102, 103]
    a = mask_tokens(ids, attn, special, 30522, torch.Generator().manual_seed(9))
    b = mask_tokens(ids, attn, special, 30522, torch.Generator().manual_seed(9))
    c = mask_tokens(ids, attn, special, 30522, torch.Generator().manual_seed(10))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    g1, g2 = mlm_generator(1, 5, 0), mlm_generator(1, 5, 0)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    assert not torch.equal(torch.rand(4, generator=mlm_generator(1, 5, 0)), torch.rand(4, generator=mlm_generator(1, 5, 1)))
    # short rows: ~0.85^2 chance of no selection each, yet every row with a candidate gets one
    short = torch.tensor([[CLS, 2000, 2001, SEP]] * 200 + [[CLS, SEP, PAD, PAD]])
    sattn = (short != PAD).long()
    _, labels = mask_tokens(short, sattn, special, 30522, torch.Generator().manual_seed(0))
    assert ((labels[:200] != IGNORE_INDEX).sum(dim=1) >= 1).all() and (labels[200] == IGNORE_INDEX).all()
    pool = random_token_pool(30522, special)
    assert len(pool) == 30522 - 5 and not torch.isin(pool, torch.tensor(special)).any()
