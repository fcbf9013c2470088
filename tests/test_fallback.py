"""Without ../shared/data the default corpus and vocab fall back to real text bundled with CPython
(the Python Language Reference, pydoc_data.topics) and a WordPiece vocab trained on it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tcd_ds.config import DataConfig
from tcd_ds.data.corpus import iter_documents
from tcd_ds.data.fallback import is_fallback_vocab, resolve_sources, train_wordpiece, vocab_falls_back
from tcd_ds.data.tokenizer import REQUIRED_SPECIAL_TOKENS, load_tokenizer, read_vocab, special_ids

REPO = Path(__file__).resolve().parents[1]


def _no_shared(tmp_path: Path) -> Path:
    """A working directory whose ../shared/data does not exist (the defaults are relative to it)."""
    cwd = tmp_path / "nowhere" / "cwd"
    cwd.mkdir(parents=True)
    assert not (cwd / DataConfig().corpus).exists() and not (cwd / DataConfig().vocab).exists()
    return cwd


@pytest.fixture(scope="module")
def fallback(tmp_path_factory):
    """Both fallbacks, built once, with defaults pointed at a missing directory."""
    tmp = tmp_path_factory.mktemp("fallback")
    corpus, vocab = str(tmp / "missing" / "wikipedia"), str(tmp / "missing" / "vocab.txt")
    warnings: list[str] = []
    out = resolve_sources(corpus, vocab, str(tmp / "cache"), warnings.append,
                          default_corpus=corpus, default_vocab=vocab)
    return {"tmp": tmp, "corpus": Path(out[0]), "vocab": Path(out[1]), "warnings": warnings,
            "defaults": (corpus, vocab)}


def test_fallback_corpus_is_real_english_prose(fallback):
    corpus = fallback["corpus"]
    assert corpus.name.startswith("fallback-corpus-") and corpus.parent == fallback["tmp"] / "cache"
    files = sorted(corpus.glob("*.txt"))
    docs = list(iter_documents(str(corpus)))
    assert len(files) == len(docs) >= 50  # one document per Language Reference topic
    text = "\n".join(docs)
    assert len(text.encode()) > 300_000 and len(text.split()) > 40_000
    words = re.findall(r"[a-z]+", text.lower())
    assert words.count("the") > 2000 and words.count("function") > 100 and words.count("statement") > 100
    assert "The \"if\" statement is used for conditional execution" in text
    assert not re.search(r"^\*{5,}$", text, re.M)  # heading underlines are dropped
    source = json.loads((corpus / "SOURCE.json").read_text())
    assert source["documents"] == len(docs) and "pydoc_data" in source["source"]


def test_fallback_vocab_is_bert_style(fallback):
    vocab = read_vocab(fallback["vocab"])
    assert [vocab[t] for t in REQUIRED_SPECIAL_TOKENS] == [0, 1, 2, 3, 4]  # [PAD] [UNK] [CLS] [SEP] [MASK]
    assert 2000 < len(vocab) <= 8192 and "##s" in vocab
    tok = load_tokenizer(fallback["vocab"])
    assert tok.tokenize("The function returns a value.") == ["the", "function", "returns", "a", "value", "."]
    sp = special_ids(tok)
    assert (sp.pad, sp.unk, sp.cls, sp.sep, sp.mask, sp.vocab_size) == (0, 1, 2, 3, 4, len(vocab))
    assert is_fallback_vocab(fallback["vocab"]) and is_fallback_vocab(fallback["vocab"].parent)
    assert not is_fallback_vocab(REPO / "vocab.txt")


def test_one_warning_line_per_fallback(fallback):
    corpus_line, vocab_line = fallback["warnings"]
    assert "\n" not in corpus_line + vocab_line
    assert corpus_line.startswith(f"warning: data.corpus {fallback['defaults'][0]} not found")
    assert "Language Reference" in corpus_line and str(fallback["corpus"]) in corpus_line
    assert vocab_line.startswith(f"warning: data.vocab {fallback['defaults'][1]} not found")
    assert f"{len(read_vocab(fallback['vocab']))} tokens" in vocab_line and str(fallback["vocab"]) in vocab_line


@pytest.mark.slow
@pytest.mark.multiproc
def test_deterministic(fallback, tmp_path):
    corpus, vocab = fallback["defaults"]
    again = resolve_sources(corpus, vocab, str(tmp_path), None, default_corpus=corpus, default_vocab=vocab)
    assert Path(again[0]).name == fallback["corpus"].name  # same content hash
    assert Path(again[1]).parent.name == fallback["vocab"].parent.name
    for a in fallback["corpus"].glob("*.txt"):
        assert (Path(again[0]) / a.name).read_bytes() == a.read_bytes()
    assert Path(again[1]).read_bytes() == fallback["vocab"].read_bytes()
    # the tokenizers trainer numbers pieces in hash-map order unless pinned: a fresh process must agree
    code = ("import sys; from tcd_ds.data.corpus import iter_documents; from tcd_ds.data.fallback import "
            "train_wordpiece; sys.stdout.write(''.join(t + '\\n' for t in train_wordpiece("
            f"list(iter_documents({str(fallback['corpus'])!r})))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout == fallback["vocab"].read_text(encoding="utf-8")


def test_existing_sources_and_hub_names_pass_through(tmp_path):
    text = tmp_path / "own.txt"
    text.write_text("A small corpus of my own.\n")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(REQUIRED_SPECIAL_TOKENS) + "\n")
    warnings: list[str] = []
    for pair in [(str(text), str(vocab)), ("wikitext:wikitext-2-raw-v1", "bert-base-uncased")]:
        assert resolve_sources(*pair, str(tmp_path / "cache"), warnings.append) == pair
    assert warnings == [] and not (tmp_path / "cache").exists()


def test_missing_explicit_path_is_an_error(tmp_path):
    cache = tmp_path / "cache"
    bad_corpus, bad_vocab = str(tmp_path / "typo" / "wiki"), str(tmp_path / "typo" / "vocab.txt")
    default_vocab = str(tmp_path / "missing" / "default-vocab.txt")
    with pytest.raises(FileNotFoundError, match=re.escape(bad_corpus)):
        resolve_sources(bad_corpus, default_vocab, str(cache), default_vocab=default_vocab)
    with pytest.raises(FileNotFoundError, match=re.escape(bad_vocab)):
        resolve_sources(DataConfig().corpus, bad_vocab, str(cache), default_corpus=str(tmp_path / "elsewhere"))
    assert not cache.exists()  # refused before anything was built


def test_default_vocab_missing_trains_on_the_users_corpus(fallback, tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    for f in sorted(fallback["corpus"].glob("*.txt"))[:20]:
        (own / f.name).write_bytes(f.read_bytes())
    missing = str(tmp_path / "missing" / "vocab.txt")
    warnings: list[str] = []
    corpus, vocab = resolve_sources(str(own), missing, str(tmp_path / "cache"), warnings.append,
                                    default_vocab=missing)
    assert corpus == str(own) and is_fallback_vocab(vocab) and vocab_falls_back(missing, missing)
    assert len(warnings) == 1 and f"trained on {own}" in warnings[0]
    assert read_vocab(vocab)["[PAD]"] == 0
    assert Path(vocab).read_text().splitlines() == train_wordpiece(list(iter_documents(str(own))))


def test_real_defaults_warn_on_stderr(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_no_shared(tmp_path))
    d = DataConfig()
    assert vocab_falls_back(d.vocab)
    corpus, vocab = resolve_sources(d.corpus, d.vocab, d.cache_dir)  # the real DataConfig defaults
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("warning: data.corpus") and lines[1].startswith("warning: data.vocab")
    assert Path(corpus).is_dir() and Path(vocab).is_file() and Path(d.cache_dir).resolve() in Path(vocab).parents


@pytest.mark.slow
@pytest.mark.multiproc
def test_train_end_to_end_without_shared_data(tmp_path):
    cwd = _no_shared(tmp_path)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "tcd_ds.train", "--config", "tiny", "--mode", "vanilla", "--deepspeed_config",
           str(REPO / "ds_configs" / "cpu_zero2.json"), "train.max_steps=3", "train.log_every=1",
           "train.eval_batches=1", f"data.cache_dir={tmp_path / 'cache'}", "data.eval_corpora=",
           f"run_dir={run_dir}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: data.corpus ../shared/data/wikipedia-en-2015 not found" in proc.stderr
    assert "warning: data.vocab ../shared/data/vocab/bert-base-uncased-vocab.txt not found" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_mlm_loss"] > 0
    exported = (run_dir / "export" / "vocab.txt").read_text().splitlines()
    assert exported[:5] == list(REQUIRED_SPECIAL_TOKENS)
    assert json.loads((run_dir / "export" / "config.json").read_text())["vocab_size"] == len(exported)
    # run_config.json records the run as it ran: the fallback corpus and vocab actually used (not the
    # missing defaults), the vocab size they gave the model, and what the environment decided
    recorded = json.loads((run_dir / "run_config.json").read_text())
    corpus, vocab = Path(recorded["data"]["corpus"]), Path(recorded["data"]["vocab"])
    assert corpus.name.startswith("fallback-corpus-") and (corpus / "SOURCE.json").is_file(), recorded["data"]
    assert is_fallback_vocab(vocab) and vocab.is_file() and vocab.read_text().splitlines() == exported
    assert recorded["model"]["vocab_size"] == len(exported)
    assert recorded["run"]["world_size"] == 1 and recorded["run"]["dtype"] == "fp32"
    assert recorded["run"]["resume_from"] is None and recorded["run"]["ds_config"]["train_micro_batch_size_per_gpu"]


def test_trained_vocab_on_request(fallback, tmp_path):
    """data.vocab=wordpiece:N trains the WordPiece recipe on the corpus in use, capped at N tokens,
    cached by content: a recipe choice for speed (a smaller MLM head), not a fallback."""
    from tcd_ds.config import ConfigError, build_config
    from tcd_ds.data.fallback import trained_vocab_size

    corpus = str(fallback["corpus"])
    lines: list[str] = []
    _, vocab = resolve_sources(corpus, "wordpiece:600", str(tmp_path / "cache"), lines.append)
    tokens = Path(vocab).read_text().splitlines()
    assert len(tokens) == 600 and tokens[:5] == list(REQUIRED_SPECIAL_TOKENS)
    assert tokens == train_wordpiece(list(iter_documents(corpus)), 600)
    assert is_fallback_vocab(vocab) and vocab_falls_back("wordpiece:600")  # the model's size follows it
    assert len(lines) == 1 and lines[0].startswith("data.vocab=wordpiece:600: an uncased WordPiece vocab of 600")
    again = resolve_sources(corpus, "wordpiece:600", str(tmp_path / "cache"), None)[1]
    assert again == vocab  # cached: the same directory, not trained twice
    assert trained_vocab_size("wordpiece:8192") == 8192 and trained_vocab_size("bert-base-uncased") is None
    with pytest.raises(ConfigError, match=r"wordpiece:N with N >= 256"):
        build_config("tiny", ["mode=vanilla", "data.vocab=wordpiece:12"])
    with pytest.raises(ValueError, match=">= 256"):
        resolve_sources(corpus, "wordpiece:100", str(tmp_path / "cache"), None)


@pytest.mark.slow
@pytest.mark.multiproc
def test_train_with_a_trained_vocab(fallback, tmp_path):
    """The trainer adopts the trained vocab's size and exports it with the model."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "tcd_ds.train", "--config", "tiny", "--mode", "vanilla", "--deepspeed_config",
           str(REPO / "ds_configs" / "cpu_zero2.json"), "train.max_steps=2", "train.log_every=1",
           "train.eval_batches=1", f"data.cache_dir={tmp_path / 'cache'}", "data.eval_corpora=",
           f"data.corpus={fallback['corpus']}", "data.vocab=wordpiece:700", f"run_dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data.vocab=wordpiece:700: an uncased WordPiece vocab of 700 tokens" in proc.stderr
    exported = (run_dir / "export" / "vocab.txt").read_text().splitlines()
    assert len(exported) == 700
    assert json.loads((run_dir / "export" / "config.json").read_text())["vocab_size"] == 700
