"""GLUE fine-tuning sweep (tcd_ds.finetune) on tiny models made on the fly.

Real vocab and real GLUE files come from ../shared/data (these tests skip with the reason when it
is absent); STS-B and the learnability check use small synthetic TSVs in the official layout.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tcd_ds import finetune
from tcd_ds.config import ModelConfig, MoEConfig
from tcd_ds.model.bert import BertForMaskedLM
from tcd_ds.model.hf import CheckpointError, read_pretrained, save_pretrained

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
METRIC_KEYS = {"MRPC": {"f1", "accuracy"}, "CoLA": {"mcc"}, "STS-B": {"pearson", "spearman"},
               "SST-2": {"accuracy"}, "MNLI": {"accuracy_m", "accuracy_mm", "accuracy"}}
WORDS = ("the a movie film story actor plot scene music long short old new city night day man woman "
         "house car").split()


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    dense = ModelConfig(**TINY)
    moe = ModelConfig(**TINY, moe=MoEConfig(num_experts=4))
    return {"dense": save_pretrained(BertForMaskedLM(dense), dense, root / "dense"),
            "moe": save_pretrained(BertForMaskedLM(moe), moe, root / "moe")}


def _args(model: Path, task: str, glue_dir: Path, vocab: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--task", task, "--glue-dir", str(glue_dir), "--vocab", str(vocab),
            "--out", str(out), "--epochs", "1", "--max-train-examples", "64", "--max-eval-examples", "64",
            "--threads", "2", *extra]


def _sentence(rng: random.Random) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]


def write_sst2(root: Path, n_train: int = 192, n_dev: int = 96, seed: int = 0) -> Path:
    """SST-2 layout; label 1 iff the sentence contains "excellent" (half the rows)."""
    rng = random.Random(seed)
    d = root / "SST-2"
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = []
        for i in range(n):
            words, label = _sentence(rng), i % 2
            if label:
                words.insert(rng.randrange(len(words) + 1), "excellent")
            rows.append(f"{' '.join(words)} \t{label}")
        (d / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return root


def write_stsb(root: Path, n_train: int = 48, n_dev: int = 32) -> Path:
    """STS-B in the official layout (10 columns, the score last); score = 5 * word overlap."""
    rng = random.Random(1)
    d = root / "STS-B"
    d.mkdir(parents=True, exist_ok=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = [header]
        for i in range(n):
            a, b = _sentence(rng), _sentence(rng)
            score = 5.0 * len(set(a) & set(b)) / len(set(a) | set(b))
            rows.append(f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{' '.join(a)}\t"
                        f"{' '.join(b)}\t{score:.3f}")
        (d / name).write_text("\n".join(rows) + "\n")
    return root


def _check_results(res: dict, task: str, lrs: list[float], seeds: list[int], out: Path) -> None:
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    for key in ("task", "model", "lrs", "seeds", "epochs", "best_lr", "metrics", "glue_score", "per_lr"):
        assert key in res, key
    assert res["task"] == task and res["lrs"] == lrs and res["seeds"] == seeds and res["best_lr"] in lrs
    assert set(res["metrics"]) == METRIC_KEYS[task]
    for stats in [*res["metrics"].values(), res["glue_score"]]:
        assert set(stats) == {"per_seed", "median", "mean", "std"}
        assert len(stats["per_seed"]) == len(seeds) and all(math.isfinite(v) for v in stats["per_seed"])
    assert set(res["per_lr"]) == {f"{lr:g}" for lr in lrs}
    for entry in res["per_lr"].values():
        assert set(entry["per_seed"]) == METRIC_KEYS[task] | {"glue_score"}
        assert set(entry["median"]) == METRIC_KEYS[task] | {"glue_score"}
    medians = {lr: res["per_lr"][f"{lr:g}"]["median"]["glue_score"] for lr in lrs}
    assert medians[res["best_lr"]] == max(medians.values())
    assert res["glue_score"]["per_seed"] == res["per_lr"][f"{res['best_lr']:g}"]["per_seed"]["glue_score"]


def _runs(out: Path) -> list[str]:
    return (out / "runs.jsonl").read_text().splitlines()


# ------------------------------------------------------------------------------- real GLUE data


@pytest.mark.slow
@pytest.mark.parametrize("task", ["MRPC", "cola"])
def test_results_structure_on_real_glue(task, models, shared_data, vocab_file, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    res = finetune.main(_args(models["dense"], task, shared_data / "glue", vocab_file, out,
                              "--lrs", "1e-4,3e-4", "--seeds", "1"))
    name = {"MRPC": "MRPC", "cola": "CoLA"}[task]
    _check_results(res, name, [1e-4, 3e-4], [1], out)
    lines = [json.loads(x) for x in _runs(out)]
    assert len(lines) == 2
    for rec in lines:
        assert {"task", "model", "lr", "seed", "epochs", "metrics", "seconds", "best_epoch", "history"} <= set(rec)
        assert rec["task"] == name and rec["epochs"] == 1 and rec["num_train"] == 64
        assert rec["metrics"] == rec["history"][-1]["metrics"]  # reported = last epoch
    captured = capsys.readouterr()
    assert captured.err.count("epoch 1/1") == 2  # one progress line per epoch per run
    assert name in captured.out and "glue_score" in captured.out  # the summary table


@pytest.mark.slow
@pytest.mark.multiproc
def test_missing_task_dir_exits_2_with_one_line(models, vocab_file, tmp_path) -> None:
    glue_dir = write_sst2(tmp_path / "glue", 8, 8)
    cmd = [sys.executable, "-m", "tcd_ds.finetune",
           *_args(models["dense"], "RTE", glue_dir, vocab_file, tmp_path / "out")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert str(glue_dir / "RTE") in lines[0] and "Traceback" not in proc.stderr


def test_missing_file_malformed_row_and_bad_args(models, vocab_file, tmp_path, capsys, monkeypatch) -> None:
    glue_dir = write_sst2(tmp_path / "glue", 8, 8)

    def fails(*extra: str, task: str = "sst-2") -> str:
        with pytest.raises(SystemExit) as exc:
            finetune.main(_args(models["dense"], task, glue_dir, vocab_file, tmp_path / "out", *extra))
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    assert "--lrs" in fails("--lrs", "2e-5,abc")
    assert "--lrs" in fails("--lrs", "-1e-5")
    assert "--seeds" in fails("--seeds", "1,x")
    assert "--seeds" in fails("--seeds", "1,1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "single-process" in fails()
    monkeypatch.delenv("WORLD_SIZE")
    assert finetune.parse_args(_args(models["dense"], "sst-2", glue_dir, vocab_file, tmp_path, "--local_rank=0"))

    (glue_dir / "SST-2" / "dev.tsv").unlink()
    assert str(glue_dir / "SST-2" / "dev.tsv") in fails()
    (glue_dir / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine \t1\n")
    (glue_dir / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood \t1\nbad \tpositive\n")
    msg = fails()
    assert f"{glue_dir / 'SST-2' / 'train.tsv'}:3:" in msg and "unknown label" in msg
    assert str(tmp_path / "nope") in fails("--model", str(tmp_path / "nope"))


# ------------------------------------------------------------------------------ regression task


def test_stsb_regression(models, vocab_file, tmp_path) -> None:
    glue_dir = write_stsb(tmp_path / "glue")
    out = tmp_path / "out"
    res = finetune.main(_args(models["dense"], "sts-b", glue_dir, vocab_file, out, "--lrs", "1e-3", "--seeds", "1,2"))
    _check_results(res, "STS-B", [1e-3], [1, 2], out)
    assert res["metrics"]["pearson"]["std"] == pytest.approx(
        torch.tensor(res["metrics"]["pearson"]["per_seed"], dtype=torch.float64).std(unbiased=True).item())


def test_mnli_reports_matched_and_mismatched(models, vocab_file, tmp_path) -> None:
    from tcd_ds.data.glue import _MNLI_DEV, _MNLI_TRAIN

    rng = random.Random(2)
    d = tmp_path / "glue" / "MNLI"
    d.mkdir(parents=True)
    labels = ("entailment", "neutral", "contradiction")
    for name, cols, n in (("train.tsv", _MNLI_TRAIN, 24), ("dev_matched.tsv", _MNLI_DEV, 12),
                          ("dev_mismatched.tsv", _MNLI_DEV, 10)):
        rows = ["\t".join(cols)]
        for i in range(n):
            fields = {c: "x" for c in cols}
            fields.update(index=str(i), sentence1=" ".join(_sentence(rng)), sentence2=" ".join(_sentence(rng)),
                          gold_label=labels[i % 3])
            rows.append("\t".join(fields[c] for c in cols))
        (d / name).write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    res = finetune.main(_args(models["dense"], "mnli", tmp_path / "glue", vocab_file, out, "--lrs", "1e-3",
                              "--seeds", "1"))
    _check_results(res, "MNLI", [1e-3], [1], out)
    m = {k: v["per_seed"][0] for k, v in res["metrics"].items()}
    assert m["accuracy"] == pytest.approx((m["accuracy_m"] + m["accuracy_mm"]) / 2)
    assert res["glue_score"]["per_seed"][0] == pytest.approx(m["accuracy"])
    assert json.loads(_runs(out)[0])["num_train"] == 24


# ------------------------------------------------------------------ resume, determinism, learning


@pytest.mark.slow
def test_resume_and_determinism(models, vocab_file, tmp_path, capsys) -> None:
    glue_dir = write_sst2(tmp_path / "glue", 64, 32)
    out = tmp_path / "out"
    finetune.main(_args(models["dense"], "SST-2", glue_dir, vocab_file, out, "--lrs", "2e-4", "--seeds", "1"))
    first = _runs(out)
    assert len(first) == 1
    capsys.readouterr()
    res = finetune.main(_args(models["dense"], "SST-2", glue_dir, vocab_file, out, "--lrs", "2e-4", "--seeds", "1,2"))
    lines = _runs(out)
    assert len(lines) == 2 and lines[0] == first[0]  # only the new seed ran; the old line untouched
    err = capsys.readouterr().err
    assert "seed=1] already in" in err and "seed=1] epoch" not in err and "seed=2] epoch 1/1" in err
    assert len(res["metrics"]["accuracy"]["per_seed"]) == 2

    # the same seed in a fresh directory gives exactly the same losses and metrics
    again = finetune.main(_args(models["dense"], "SST-2", glue_dir, vocab_file, tmp_path / "again",
                                "--lrs", "2e-4", "--seeds", "2"))
    rec_a, rec_b = json.loads(lines[1]), json.loads(_runs(tmp_path / "again")[0])
    assert rec_a["history"][0]["train_loss"] == rec_b["history"][0]["train_loss"]
    assert rec_a["metrics"] == rec_b["metrics"]
    assert again["metrics"]["accuracy"]["per_seed"] == [res["metrics"]["accuracy"]["per_seed"][1]]

    # other settings are a different run, not a resumed one
    finetune.main(_args(models["dense"], "SST-2", glue_dir, vocab_file, out, "--lrs", "2e-4", "--seeds", "1",
                        "--batch-size", "16"))
    assert len(_runs(out)) == 3


@pytest.mark.slow
def test_learns_an_easy_task(models, vocab_file, tmp_path) -> None:
    glue_dir = write_sst2(tmp_path / "glue")
    res = finetune.main(["--model", str(models["dense"]), "--task", "sst2", "--glue-dir", str(glue_dir),
                         "--vocab", str(vocab_file), "--out", str(tmp_path / "out"), "--lrs", "3e-3",
                         "--seeds", "1", "--epochs", "4", "--batch-size", "16", "--threads", "2"])
    assert res["metrics"]["accuracy"]["mean"] >= 0.85  # chance is 0.5 (balanced labels)


# ---------------------------------------------------------------------------------------- MoE


@pytest.mark.slow
def test_moe_finetunes_with_its_aux_loss(models, shared_data, vocab_file, tmp_path) -> None:
    out = tmp_path / "out"
    res = finetune.main(_args(models["moe"], "MRPC", shared_data / "glue", vocab_file, out,
                              "--lrs", "1e-4", "--seeds", "1"))
    _check_results(res, "MRPC", [1e-4], [1], out)
    rec = json.loads(_runs(out)[0])
    assert rec["history"][0]["aux_loss"] > 0 and rec["settings"]["moe_backend"] == "torch"

    out0 = tmp_path / "out0"
    finetune.main(_args(models["moe"], "MRPC", shared_data / "glue", vocab_file, out0,
                        "--lrs", "1e-4", "--seeds", "1", "--aux-loss-weight", "0"))
    assert json.loads(_runs(out0)[0])["history"][0]["aux_loss"] == 0.0

    # the training loss is the task loss plus the router loss; the weight override reaches the layers
    torch.manual_seed(0)
    model = finetune.build_model(models["moe"], 2, aux_loss_weight=0.5).eval()
    assert model.config.moe.aux_loss_weight == 0.5
    ids = torch.randint(1000, 2000, (3, 7))
    labels = torch.tensor([0, 1, 1])
    loss, logits, aux = model(ids, torch.ones_like(ids), torch.zeros_like(ids), labels)
    assert aux > 0
    assert loss.item() == pytest.approx((torch.nn.functional.cross_entropy(logits, labels) + aux).item())

    torch.manual_seed(0)
    grouped = finetune.build_model(models["moe"], 2, aux_loss_weight=0.5, moe_backend="grouped").eval()
    _, logits_g, aux_g = grouped(ids, torch.ones_like(ids), torch.zeros_like(ids), labels)
    torch.testing.assert_close(logits_g, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(aux_g, aux)


# ------------------------------------------------------------------------------ checkpoint loading


def test_loading_is_strict_except_for_the_heads(models, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    cfg, sd = read_pretrained(models["dense"])
    model = finetune.build_model(models["dense"], 3)
    own = model.state_dict()
    for k, v in sd.items():  # every encoder weight comes from the checkpoint
        if k.startswith("bert."):
            assert torch.equal(own[k], v), k
    assert model.classifier.out_features == 3

    def broken(name: str, change) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((models["dense"] / "config.json").read_text())
        w = load_file(str(models["dense"] / "model.safetensors"))
        change(w)
        save_file(w, str(d / "model.safetensors"))
        return d

    extra = broken("extra", lambda w: w.__setitem__("bert.encoder.layer.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected \['encoder.layer.0.extra.weight'\]"):
        finetune.build_model(extra, 2)
    missing = broken("missing", lambda w: w.pop("bert.encoder.layer.1.output.dense.weight"))
    with pytest.raises(CheckpointError, match=r"missing \['encoder.layer.1.output.dense.weight'\]") as exc:
        finetune.build_model(missing, 2)
    assert str(missing) in str(exc.value)


def test_loads_transformers_bert_dirs(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    mlm = transformers.BertForMaskedLM(hf_cfg)  # no pooler: ours is new
    mlm.save_pretrained(tmp_path / "mlm")
    model = finetune.build_model(tmp_path / "mlm", 2)
    torch.testing.assert_close(model.bert.encoder.layer[1].output.dense.weight,
                               mlm.bert.encoder.layer[1].output.dense.weight)
    base = transformers.BertModel(hf_cfg)  # with a pooler: it is loaded, as Hugging Face does
    base.save_pretrained(tmp_path / "base")
    model = finetune.build_model(tmp_path / "base", 1)
    torch.testing.assert_close(model.bert.pooler.dense.weight, base.pooler.dense.weight)
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)


# ------------------------------------------------------------- progress, summary table, threads


@pytest.mark.slow
def test_progress_lines_with_eta_inside_epochs(models, vocab_file, tmp_path, capsys) -> None:
    glue_dir = write_sst2(tmp_path / "glue", 64, 16)
    finetune.main(_args(models["dense"], "SST-2", glue_dir, vocab_file, tmp_path / "out", "--lrs", "1e-3",
                        "--seeds", "1", "--batch-size", "4", "--epochs", "2"))
    err = capsys.readouterr().err.splitlines()
    progress = [line for line in err if "% of epoch" in line]
    # 16 steps an epoch: a line every 2 steps (10% rounded up), the last step gives way to the epoch line
    steps = [line.split("step ")[1].split(",")[0] for line in progress]
    assert steps == [f"{k}/16" for k in range(2, 16, 2)] * 2, progress
    assert all("ETA epoch " in line and ", run " in line and "steps/s" in line for line in progress)
    assert progress[0].startswith("[SST-2 lr=0.001 seed=1] 12% of epoch 1: step 2/16, loss ")
    assert sum("epoch 1/2" in line for line in err) == 1 and sum("epoch 2/2" in line for line in err) == 1


def test_progress_every_n_seconds_in_long_epochs(monkeypatch, capsys) -> None:
    clock = iter([0.0, 5.0, 10.0, 41.0, 45.0, 80.0])  # start, then one reading per step
    monkeypatch.setattr(finetune.time, "perf_counter", lambda: next(clock))
    progress = finetune.Progress("t", steps_per_epoch=1000, epochs=2, every_s=30)
    for step in range(1, 6):
        progress.step(1, step, 0.5)
    lines = capsys.readouterr().err.splitlines()
    # 10% is 100 steps away; the 30 s mark passes at step 3 (41 s) and step 5 (80 s, 39 s later)
    assert [line.split("step ")[1].split(",")[0] for line in lines] == ["3/1000", "5/1000"]
    assert "ETA epoch 3h47m06s, run 7h34m52s" in lines[0]  # 41 s / 3 steps x 997 and 1997 steps to go


def _results(seeds: list[int]) -> dict:
    spec = finetune.glue.get_task("MRPC")
    runs = {(2e-5, s): {"metrics": {"f1": 0.8122 + 0.01 * i, "accuracy": 0.6838}, "glue_score": 0.748 + 0.01 * i}
            for i, s in enumerate(seeds)}
    summary = finetune.summarize(spec, runs, [2e-5], seeds)
    return {"task": "MRPC", "model": "m", "epochs": 1, "seeds": seeds, "best_lr": summary["best_lr"],
            "metrics": summary["metrics"], "glue_score": summary["glue_score"], "per_lr": summary["per_lr"]}


def test_single_seed_summary_shows_no_spread() -> None:
    one = finetune.format_table(_results([1])).splitlines()
    assert "+-" not in "\n".join(one)
    assert one[-1].split()[:3] == ["best", "81.22", "68.38"] and one[-1].endswith("(seed 1, lr 2e-05)")
    many = finetune.format_table(_results([1, 2, 3])).splitlines()
    assert "81.22+-" not in many[-1] and "82.22+-1.00" in many[-1] and "(mean+-sample std, lr 2e-05)" in many[-1]


def test_threads_follow_the_idle_cores(monkeypatch) -> None:
    assert finetune.choose_threads(4, None) == 4  # unknown load: every core this process may use
    assert finetune.choose_threads(4, 2.6) == 3
    assert finetune.choose_threads(2, 0.1) == 1  # a host whose cores other jobs hold: one thread, not 2
    assert finetune.choose_threads(2, 7.0) == 2
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(finetune.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    try:
        monkeypatch.setattr(finetune, "idle_cores", lambda: 0.2)
        note = finetune.set_threads(0)
        assert torch.get_num_threads() == 1 and note.startswith("1 thread (4 cores available, 0.2 idle")
        assert finetune.set_threads(3).startswith("3 threads (--threads") and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own setting is kept
        assert finetune.set_threads(0).startswith("3 threads (OMP_NUM_THREADS") and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_idle_cores_reads_proc_stat(monkeypatch) -> None:
    samples = iter(["cpu  9 9 9 9\ncpu0 100 0 0 100 0 0 0 0\ncpu1 100 0 0 100 0 0 0 0\ncpu2 0 0 0 0 0 0 0 0\n",
                    "cpu  9 9 9 9\ncpu0 190 0 0 110 0 0 0 0\ncpu1 150 0 0 150 0 0 0 0\ncpu2 0 0 0 900 0 0 0 0\n"])
    monkeypatch.setattr(finetune.Path, "read_text", lambda self: next(samples))
    monkeypatch.setattr(finetune.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    # cores 0 and 1 (cpu2 is outside the affinity): 10 + 50 idle jiffies of 200 -> 0.6 of 2 cores
    assert finetune.idle_cores(0.0) == pytest.approx(0.6)


def test_length_batching_is_a_permutation_of_similar_length_batches_in_random_order():
    from tcd_ds.finetune import GROUP_BATCHES, epoch_order

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (GROUP_BATCHES * 8 * 3 + 5,), generator=gen).tolist()
    bs = 8
    order = epoch_order(lengths, bs, torch.Generator().manual_seed(1), "length")
    assert sorted(order) == list(range(len(lengths)))  # every example once
    batches = [order[i:i + bs] for i in range(0, len(order), bs)]
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    rand = epoch_order(lengths, bs, torch.Generator().manual_seed(1), "random")
    assert rand == torch.randperm(len(lengths), generator=torch.Generator().manual_seed(1)).tolist()
    rand_padded = sum(max(lengths[i] for i in rand[j:j + bs]) * len(rand[j:j + bs]) for j in range(0, len(rand), bs))
    assert padded < 1.15 * sum(lengths) < rand_padded  # grouped: little padding; random: much more
    firsts = [lengths[b[0]] for b in batches]
    assert firsts != sorted(firsts, reverse=True) and firsts != sorted(firsts)  # the batches' order is shuffled
    again = epoch_order(lengths, bs, torch.Generator().manual_seed(1), "length")
    other = epoch_order(lengths, bs, torch.Generator().manual_seed(2), "length")
    assert again == order and other != order  # seeded


def test_arguments_are_the_typed_finetune_args_with_its_defaults():
    args = finetune.parse_args(["--model", "m", "--task", "MRPC", "--glue-dir", "g"])
    assert args == finetune.FinetuneArgs(model="m", task="MRPC", glue_dir="g")  # every default from one place
    args = finetune.parse_args(["--model", "m", "--task", "MRPC", "--glue-dir", "g", "--lrs", "1e-4,3e-4",
                                "--seeds", "4", "--epochs", "1", "--aux-loss-weight", "0"])
    assert (args.lrs, args.seeds, args.epochs, args.aux_loss_weight) == ([1e-4, 3e-4], [4], 1, 0.0)


def test_fine_tuning_uses_berts_dropout_whatever_pre_training_used(tmp_path):
    """A model pre-trained without dropout (the small recipes) fine-tunes with 0.1 on hidden states and
    attention unless --dropout says otherwise; the sweep's settings record it."""
    cfg = ModelConfig(**{**TINY, "hidden_dropout": 0.0, "attention_dropout": 0.0})
    path = save_pretrained(BertForMaskedLM(cfg), cfg, tmp_path / "no-dropout")
    assert finetune.parse_args(["--model", "m", "--task", "MRPC", "--glue-dir", "g"]).dropout == 0.1

    def rates(dropout):
        model = finetune.build_model(path, 2, dropout=dropout)
        ps = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
        return ps | {model.config.hidden_dropout, model.config.attention_dropout}

    assert rates(0.1) == {0.1} and rates(0.0) == {0.0} and rates(None) == {0.0}
    args = finetune.parse_args(["--model", str(path), "--task", "MRPC", "--glue-dir", "g", "--dropout", "0.2"])
    assert finetune._run_settings(args, cfg, "v")["dropout"] == 0.2


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0"], "argument --epochs: 0 must be >= 1"),
    (["--lrs="], "argument --lrs: give at least one learning rate"),
    (["--lrs=1e-4,-1e-5"], "argument --lrs: learning rate -1e-05 must be a positive number"),
    (["--lrs", "1e-4,abc"], "argument --lrs: '1e-4,abc' is not a list of float"),
    (["--seeds", "2,2"], "argument --seeds: duplicate seed in 2,2"),
    (["--warmup-ratio", "1"], "argument --warmup-ratio: 1.0 must be in [0, 1)"),
    (["--max-seq-len", "4"], "argument --max-seq-len: 4 must be >= 8"),
    (["--weight-decay=-1"], "argument --weight-decay: -1.0 must be >= 0"),
    (["--aux-loss-weight", "nan"], "argument --aux-loss-weight: nan must be >= 0"),
    (["--threads", "1.5"], "argument --threads: '1.5' is not int"),
    (["--dropout", "1"], "argument --dropout: 1.0 must be in [0, 1)"),
])
def test_bad_arguments_are_one_line_naming_the_flag(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        finetune.parse_args(["--model", "m", "--task", "MRPC", "--glue-dir", "g", *extra])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines


def test_a_second_sweep_in_a_busy_out_dir_is_refused(models, vocab_file, tmp_path, capsys) -> None:
    """Two sweeps in one out dir would each run the seeds the other is running and append them
    twice to runs.jsonl: while a live process holds the dir, a sweep exits 2 with one line naming the
    holder and runs nothing; once the holder has died, the same command runs."""
    glue_dir = write_sst2(tmp_path / "glue", 64, 32)
    out = tmp_path / "out"
    out.mkdir()
    hold = ("import sys, time\nfrom pathlib import Path\nfrom tcd_ds.locks import RunDirLock\n"
            "lock = RunDirLock.acquire(Path(sys.argv[1]), 'fine-tuning')\nprint('held', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    args = _args(models["dense"], "SST-2", glue_dir, vocab_file, out, "--lrs", "2e-4", "--seeds", "1")
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as err:
            finetune.main(args)
        assert err.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and f"out dir {out} is in use by another fine-tuning (pid {holder.pid} on " in lines[0]
        assert not (out / "runs.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert len(finetune.main(args)["metrics"]["accuracy"]["per_seed"]) == 1
    assert len(_runs(out)) == 1


def test_a_signal_saves_the_running_run_and_the_next_sweep_resumes_it(models, vocab_file, tmp_path, monkeypatch,
                                                                     capsys) -> None:
    """SIGUSR1 (the GLUE array's stop signal before its time limit, or preemption's SIGTERM) during
    the 2nd epoch of the sweep's 2nd run: the step ends, the run's state goes to interrupted.pt and
    the sweep exits 85 (requeue); the next sweep skips the finished run, resumes the stopped one where
    it stopped, and ends with exactly what a sweep never stopped gives."""
    glue_dir = write_sst2(tmp_path / "glue", 64, 32)

    def args(out: Path) -> list[str]:
        return _args(models["dense"], "SST-2", glue_dir, vocab_file, out, "--lrs", "2e-4", "--seeds", "1,2",
                     "--epochs", "2", "--batch-size", "16")  # 4 steps an epoch, 16 in the sweep

    finetune.main(args(tmp_path / "ref"))
    out = tmp_path / "out"
    real_step, calls = finetune.Progress.step, [0]

    def step(self, *a, **kw):
        calls[0] += 1
        if calls[0] == 14:  # run 2 (seed 2), epoch 2, step 2 of 4
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(self, *a, **kw)

    monkeypatch.setattr(finetune.Progress, "step", step)
    capsys.readouterr()

    def ignored(signum, frame):  # a sweep that does not handle the signal must not kill pytest
        pass

    before = signal.signal(signal.SIGUSR1, ignored)
    try:
        with pytest.raises(SystemExit) as stopped:
            finetune.main(args(out))
        assert signal.getsignal(signal.SIGUSR1) is ignored  # the sweep's handler is gone again
    finally:
        signal.signal(signal.SIGUSR1, before)
    err = capsys.readouterr().err
    assert stopped.value.code == 85, err
    assert f"[SST-2 lr=0.0002 seed=2] signal {int(signal.SIGUSR1)}: saved the run at epoch 2, step 2/4 to " \
           f"{out / 'interrupted.pt'}; exiting with status 85 (requeue: the next sweep resumes it)" in err, err
    assert len(_runs(out)) == 1 and (out / "interrupted.pt").is_file()
    monkeypatch.setattr(finetune.Progress, "step", real_step)

    finetune.main(args(out))
    err = capsys.readouterr().err
    assert "seed=1] already in" in err, err
    assert f"[SST-2 lr=0.0002 seed=2] resuming from {out / 'interrupted.pt'}: epoch 2, step 2/4" in err, err
    assert "seed=2] epoch 1/2" not in err and "seed=2] epoch 2/2" in err, err
    assert not (out / "interrupted.pt").exists()
    got, ref = [json.loads(line) for line in _runs(out)], [json.loads(line) for line in _runs(tmp_path / "ref")]
    for rec in got + ref:
        del rec["seconds"]
        for h in rec["history"]:
            del h["seconds"]
    assert got == [{**r, "model": got[0]["model"]} for r in ref]  # bit for bit, but the paths
    assert json.loads((out / "results.json").read_text())["metrics"] == \
        json.loads((tmp_path / "ref" / "results.json").read_text())["metrics"]
