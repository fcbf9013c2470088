"""`python -m tcd_ds.analyze`: relation losses and linear CKA between a model and a teacher, each
checked against an independent float64 computation (not through the taps)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tcd_ds.analyze import analyze, linear_cka, load_encoder
from tcd_ds.config import ModelConfig, MoEConfig
from tcd_ds.data.fallback import train_wordpiece
from tcd_ds.data.shards import PackedDataset, build_token_cache, read_index
from tcd_ds.data.tokenizer import load_tokenizer
from tcd_ds.model.bert import BertForMaskedLM
from tcd_ds.model.hf import save_pretrained

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the river ran past an old mill where a miller kept seven cats and a dog that barked at every "
         "boat while children counted sails under a grey sky before the rain came down on the town").split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=120)) + "." for _ in range(12)]
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n")
    vocab = train_wordpiece(docs, 300)
    dirs = {}
    for name, experts, seed in (("teacher", 0, 0), ("student", 4, 1), ("other", 0, 2)):
        cfg = ModelConfig(vocab_size=len(vocab), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          max_position=64, moe=MoEConfig(num_experts=experts))
        torch.manual_seed(seed)
        d = save_pretrained(BertForMaskedLM(cfg), cfg, tmp / name)
        (d / "vocab.txt").write_text("".join(t + "\n" for t in vocab))
        dirs[name] = d
    return {"tmp": tmp, "corpus": corpus, **dirs}


def _batch(setup, seq_len=32, n=6):
    tok = load_tokenizer(str(setup["teacher"] / "vocab.txt"))
    index = build_token_cache(str(setup["corpus"]), tok, str(setup["tmp"] / "cache"), seq_len, max_sequences=n,
                              progress=False)
    data = PackedDataset(read_index(index))
    return data.get_batch(np.arange(len(data)))


def _relation_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """TCD's MSE relation loss by the definition, one sequence at a time, float64."""
    out = []
    for i in range(a.shape[0]):
        keep = mask[i].bool()
        x, y = a[i][keep].double(), b[i][keep].double()
        rx = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(x, dim=-1).T
        ry = torch.nn.functional.normalize(y, dim=-1) @ torch.nn.functional.normalize(y, dim=-1).T
        out.append(float(((rx - ry) ** 2).sum() / keep.sum() ** 2))
    return float(np.mean(out))


def _cka_hsic(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA as HSIC with a centring matrix (Kornblith et al. eq. 3), float64."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((k * l).sum() / ((k * k).sum().sqrt() * (l * l).sum().sqrt()))


def test_linear_cka_matches_hsic_and_is_rotation_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 8, generator=g), torch.randn(50, 5, generator=g)
    assert linear_cka(x, y) == pytest.approx(_cka_hsic(x, y), rel=1e-10)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    assert linear_cka(x, 3.0 * (x.double() @ q)) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, y) < 0.9


def test_a_model_against_itself_is_zero_and_one(setup):
    r = analyze(str(setup["teacher"]), str(setup["teacher"]), str(setup["corpus"]), sequences=6, seq_len=32,
                cache_dir=str(setup["tmp"] / "cache"), progress=False)
    assert set(r["mean"]) == {"T", "I", "A"}
    assert all(e["relation"] == pytest.approx(0.0, abs=1e-10) for e in r["per_tap"].values())
    assert all(e["cka"] == pytest.approx(1.0, abs=1e-6) for e in r["per_tap"].values() if "cka" in e)


def test_relations_and_cka_equal_an_independent_computation(setup):
    r = analyze(str(setup["student"]), str(setup["teacher"]), str(setup["corpus"]), sequences=6, seq_len=32,
                cache_dir=str(setup["tmp"] / "cache"), progress=False)
    b = _batch(setup)
    ids, mask, types = b["input_ids"], b["attention_mask"], b["token_type_ids"]
    student, _, _ = load_encoder(setup["student"])
    teacher, _, _ = load_encoder(setup["teacher"])
    with torch.no_grad():
        hs = {m: [enc(ids, mask, types, num_layers=k).hidden for k in (1, 2)]
              for m, enc in (("s", student), ("t", teacher))}
        emb = {m: enc.embeddings(ids, types) for m, enc in (("s", student), ("t", teacher))}
        # I/1/attn: the attention output projection of layer 1, before dropout, residual and LayerNorm
        attn = {m: enc.encoder.layer[0].attention.output.dense(
                    enc.encoder.layer[0].attention.self(emb[m], mask.bool()[:, None, None, :]))
                for m, enc in (("s", student), ("t", teacher))}
        # A/2/k: layer 2's key projection of layer 1's output, split per head
        keys = {m: enc.encoder.layer[1].attention.self.key(hs[m][0]).unflatten(-1, (2, 16)).transpose(1, 2)
                for m, enc in (("s", student), ("t", teacher))}
    assert r["per_tap"]["T/2"]["relation"] == pytest.approx(_relation_mse(hs["s"][1], hs["t"][1], mask), rel=1e-5)
    assert r["per_tap"]["T/0"]["relation"] == pytest.approx(_relation_mse(emb["s"], emb["t"], mask), rel=1e-5)
    assert r["per_tap"]["I/1/attn"]["relation"] == pytest.approx(_relation_mse(attn["s"], attn["t"], mask), rel=1e-5)
    per_head = np.mean([_relation_mse(keys["s"][:, h], keys["t"][:, h], mask) for h in range(2)])
    assert r["per_tap"]["A/2/k"]["relation"] == pytest.approx(per_head, rel=1e-5)
    flat = mask.bool().reshape(-1)
    want = _cka_hsic(hs["s"][0].reshape(-1, 32)[flat], hs["t"][0].reshape(-1, 32)[flat])
    assert r["per_tap"]["T/1"]["cka"] == pytest.approx(want, rel=1e-6)
    assert 0.0 < r["mean"]["T"]["relation"] and r["mean"]["T"]["cka"] < 1.0


@pytest.mark.slow
@pytest.mark.multiproc
def test_cli_writes_json_and_refuses_bad_input(setup, tmp_path):
    out = tmp_path / "a.json"
    cmd = [sys.executable, "-m", "tcd_ds.analyze", str(setup["other"]), "--teacher", str(setup["teacher"]),
           "--corpus", str(setup["corpus"]), "--sequences", "4", "--seq-len", "32", "--cache-dir",
           str(setup["tmp"] / "cache"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mean T" in proc.stdout and json.loads(out.read_text())["sequences"] == 4
    bad = subprocess.run([*cmd[:4], "--teacher", str(tmp_path / "nope"), "--corpus", str(setup["corpus"])],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: model path {tmp_path / 'nope'} does not exist"]
    moe = subprocess.run([*cmd[:4], "--teacher", str(setup["student"]), "--corpus", str(setup["corpus"]),
                          "--cache-dir", str(setup["tmp"] / "cache")], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert moe.returncode == 2 and "is an MoE model" in moe.stderr and len(moe.stderr.strip().splitlines()) == 1
