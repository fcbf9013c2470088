"""GLUE readers, registry and metrics (tcd_ds.data.glue)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tcd_ds.data import glue
from tcd_ds.data.glue import (
    GLUE_TASKS, GlueDataError, accuracy, compute_metrics, f1_binary, get_task, glue_average,
    glue_score, load_hub, matthews_corrcoef, pearson, read_split, spearman,
)

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------- metrics

# y_true / y_pred pairs: (1,1)x4 -> TP=4, (1,0) -> FN=1, (0,0)x3 -> TN=3, (0,1)x2 -> FP=2
Y_TRUE = [1, 1, 1, 1, 0, 0, 0, 0, 1, 0]
Y_PRED = [1, 1, 1, 0, 0, 0, 1, 0, 1, 1]


def test_binary_metrics_by_hand() -> None:
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12-2)/sqrt(6*5*5*4) = 1/sqrt(6)
    assert matthews_corrcoef(Y_TRUE, Y_PRED) == pytest.approx(1 / math.sqrt(6))
    # F1 = 2TP / (2TP + FP + FN) = 8/11  (P = 4/6, R = 4/5)
    assert f1_binary(Y_TRUE, Y_PRED) == pytest.approx(8 / 11)
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(0.7)
    # sklearn's doc example with labels +1/-1: TP=2, FN=1, FP=1, TN=0 -> (0-1)/sqrt(3*3*1*1) = -1/3
    assert matthews_corrcoef([1, 1, 1, -1], [1, -1, 1, 1]) == pytest.approx(-1 / 3)
    assert matthews_corrcoef(Y_TRUE, Y_TRUE) == pytest.approx(1.0)
    assert matthews_corrcoef(Y_TRUE, 1 - np.array(Y_TRUE)) == pytest.approx(-1.0)


def test_multiclass_mcc_by_hand() -> None:
    # confusion (rows true 0,1,2): [[2,0,0],[0,1,1],[0,1,1]]; n=6, correct=4, t_sum=p_sum=[2,2,2]
    # cov_tp = 4*6 - 12 = 12; cov_tt = cov_pp = 36 - 12 = 24 -> 12/24 = 0.5
    assert matthews_corrcoef([0, 1, 2, 0, 1, 2], [0, 1, 1, 0, 2, 2]) == pytest.approx(0.5)


def test_degenerate_classification() -> None:
    assert matthews_corrcoef(Y_TRUE, [1] * 10) == 0.0  # constant predictions -> 0 (sklearn)
    assert matthews_corrcoef([0] * 4, [0] * 4) == 0.0
    assert f1_binary([0, 0, 0], [0, 0, 0]) == 0.0  # no positives anywhere -> 0 (sklearn zero_division)
    assert f1_binary([1, 1, 0], [0, 0, 0]) == 0.0
    with pytest.raises(ValueError, match="length mismatch"):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="empty"):
        matthews_corrcoef([], [])


def test_pearson_and_spearman_by_hand() -> None:
    # dx=[-1.5,-.5,.5,1.5], dy=[-3,-1,0,4]: sxy=11, sxx=5, syy=26 -> 11/sqrt(130)
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    # ties: ranks x=[1,2.5,2.5,4], y=[1,3,2,4]; d=[-1.5,0,0,1.5],[-1.5,.5,-.5,1.5]
    # sxy=4.5, sxx=4.5, syy=5 -> 4.5/sqrt(22.5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    np.testing.assert_allclose(glue._average_ranks(np.array([10.0, 20, 20, 5])), [2, 3.5, 3.5, 1])
    # monotone but not linear: Spearman 1, Pearson < 1
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 8, 27, 64]) < 0.99
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_degenerate_regression() -> None:
    # documented choice: zero variance -> 0.0 (scipy would give nan); non-finite input -> nan
    assert pearson([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == 0.0
    assert spearman([5.0, 5.0, 5.0], [1.0, 2.0, 3.0]) == 0.0
    assert math.isnan(pearson([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([1.0, 2.0, 3.0], [1.0, float("inf"), 3.0]))


def test_compute_metrics_keys_and_values() -> None:
    expect = {"CoLA": {"mcc"}, "SST-2": {"accuracy"}, "QNLI": {"accuracy"}, "RTE": {"accuracy"},
              "WNLI": {"accuracy"}, "MNLI": {"accuracy"}, "MRPC": {"f1", "accuracy"},
              "QQP": {"f1", "accuracy"}, "STS-B": {"pearson", "spearman"}}
    for task, keys in expect.items():
        preds, labels = ([1.0, 2.0, 3.5], [1.2, 2.0, 3.0]) if task == "STS-B" else ([0, 1, 1], [0, 1, 0])
        assert set(compute_metrics(task, preds, labels)) == keys
    m = compute_metrics("mrpc", Y_PRED, Y_TRUE)
    assert m == {"f1": pytest.approx(8 / 11), "accuracy": pytest.approx(0.7)}
    assert compute_metrics("CoLA", Y_PRED, Y_TRUE)["mcc"] == pytest.approx(1 / math.sqrt(6))
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [-1.0, 1.0]])  # argmax -> [0, 1, 1]
    assert compute_metrics("sst2", logits, [0, 1, 0]) == {"accuracy": pytest.approx(2 / 3)}
    stsb = compute_metrics("stsb", np.array([[1.0], [2.0], [3.0], [4.0]]), [2, 4, 5, 9])
    assert stsb["pearson"] == pytest.approx(11 / math.sqrt(130)) and stsb["spearman"] == pytest.approx(1.0)


def test_glue_score_and_average() -> None:
    assert glue_score("MRPC", {"f1": 0.9, "accuracy": 0.8}) == pytest.approx(0.85)
    assert glue_score("sts-b", {"pearson": 0.88, "spearman": 0.86}) == pytest.approx(0.87)
    assert glue_score("CoLA", {"mcc": 0.5}) == pytest.approx(0.5)
    assert glue_score("MNLI", {"accuracy_m": 0.84, "accuracy_mm": 0.83}) == pytest.approx(0.835)
    assert glue_score("MNLI", {"accuracy": 0.84}) == pytest.approx(0.84)
    with pytest.raises(ValueError, match="missing f1"):
        glue_score("QQP", {"accuracy": 0.9})
    scores = {"CoLA": 0.5, "sst2": 0.9, "WNLI": 0.4}
    assert glue_average(scores) == pytest.approx(0.6)
    assert glue_average(scores, include_wnli=False) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="twice"):
        glue_average({"SST-2": 0.9, "sst2": 0.9})
    with pytest.raises(ValueError, match="not part of the GLUE average"):
        glue_average({"AX": 0.3})


# ------------------------------------------------------------------------------------- registry


def test_task_lookup_case_insensitive() -> None:
    assert get_task("sst-2").name == get_task("SST2").name == get_task("sst_2").name == "SST-2"
    assert get_task("stsb").name == get_task("STS-B").name == "STS-B"
    assert get_task("cola").name == "CoLA" and get_task("MnLi").name == "MNLI"
    assert get_task("diagnostic").name == "AX"
    assert list(GLUE_TASKS) == ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI"]
    assert set(get_task("mnli").splits) == {"train", "dev_matched", "dev_mismatched",
                                            "test_matched", "test_mismatched"}
    assert get_task("STS-B").is_regression and get_task("MNLI").num_labels == 3
    assert not get_task("CoLA").splits["train"].header and get_task("CoLA").splits["test"].header
    for t in GLUE_TASKS:
        spec = get_task(t)
        assert spec.main_metric in spec.metrics
    with pytest.raises(GlueDataError, match="unknown GLUE task 'glu'"):
        get_task("glu")


# ------------------------------------------------------------------------------------- real data

REAL = {  # task: {split: (rows, label set)}
    "CoLA": {"train": (8551, {0, 1}), "dev": (1043, {0, 1}), "test": (1063, {None})},
    "SST-2": {"train": (67349, {0, 1}), "dev": (872, {0, 1}), "test": (1821, {None})},
    "MRPC": {"train": (3668, {0, 1}), "dev": (408, {0, 1}), "test": (1725, {None})},
    "WNLI": {"train": (635, {0, 1}), "dev": (71, {0, 1}), "test": (146, {None})},
    "QNLI": {"dev": (5463, {0, 1}), "test": (5463, {None})},
    "AX": {"test": (1104, {None})},
}


@pytest.mark.parametrize("task,split", [(t, s) for t, splits in REAL.items() for s in splits])
def test_real_row_counts_and_labels(shared_data: Path, task: str, split: str) -> None:
    exs = read_split(shared_data / "glue", task, split)
    rows, labels = REAL[task][split]
    assert len(exs) == rows
    assert {e.label for e in exs} == labels
    assert all(isinstance(e.text_a, str) and e.text_a for e in exs)
    assert all((e.text_b is None) == (get_task(task).text_b is None) for e in exs)
    assert not any(e.text_a.startswith("\ufeff") for e in exs)
    assert exs[0].guid == f"{split}-0"


def test_real_first_examples(shared_data: Path) -> None:
    g = shared_data / "glue"
    e = read_split(g, "cola", "train")[0]
    assert (e.text_a, e.text_b, e.label, e.line) == (
        "Our friends won't buy this analysis, let alone the next one we propose.", None, 1, 1)
    last = read_split(g, "CoLA", "dev")[-1]  # file has no trailing newline
    assert (last.text_a, last.label, last.line) == ("John talked to Bill about himself.", 1, 1043)
    e = read_split(g, "sst-2", "dev")[0]
    assert (e.text_a, e.label, e.line) == ("it 's a charming and often affecting journey . ", 1, 2)
    e = read_split(g, "MRPC", "train")[0]  # the file starts with a BOM before "Quality"
    assert e.text_a.startswith("Amrozi accused his brother , whom he called \" the witness \"")
    assert e.text_b.startswith("Referring to him as only \" the witness \"") and e.label == 1
    e = read_split(g, "QNLI", "dev")[0]
    assert e.text_a == "What came into force after the new constitution was herald?"
    assert e.label == get_task("QNLI").labels.index("entailment") == 0
    e = read_split(g / "WNLI", "wnli", "dev")[0]  # the task folder itself also works
    assert (e.text_b, e.label) == ("The hair has to be cleaned.", 0)
    # first example equals the raw first data line split on tabs
    raw = (g / "SST-2" / "train.tsv").read_text(encoding="utf-8").split("\n")[1].split("\t")
    assert read_split(g, "SST-2", "train")[0].text_a == raw[0]


def test_real_missing_file_message(shared_data: Path) -> None:
    with pytest.raises(GlueDataError) as ei:
        read_split(shared_data / "glue", "QNLI", "train")
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(shared_data / "glue" / "QNLI" / "train.tsv") in msg and "dev.tsv, test.tsv" in msg
    with pytest.raises(GlueDataError) as ei:
        read_split(shared_data / "glue", "QQP", "dev")
    assert "\n" not in str(ei.value) and "QQP" in str(ei.value) and "CoLA" in str(ei.value)


# ------------------------------------------------------------------------------------- synthetic


def _write(path: Path, rows: list[list[str]], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join("\t".join(r) for r in rows) + "\n"
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")


def test_synthetic_stsb(tmp_path: Path) -> None:
    spec = get_task("STS-B")
    d = tmp_path / "glue" / "STS-B"
    meta = ["main-captions", "MSRvid", "2012test", "0001", "none", "none"]
    _write(d / "train.tsv", [list(spec.splits["train"].columns),
                             ["0", *meta, "A plane is taking off.", "An air plane is taking off.", "5.000"],
                             ["1", *meta, "A man \"plays.", "A man is playing a flute.", "3.800"]])
    _write(d / "test.tsv", [list(spec.splits["test"].columns), ["0", *meta, "A girl sings.", "A boy sings."]])
    exs = read_split(tmp_path / "glue", "stsb", "train")
    assert [(e.text_a, e.text_b, e.label) for e in exs] == [
        ("A plane is taking off.", "An air plane is taking off.", 5.0),
        ("A man \"plays.", "A man is playing a flute.", 3.8)]
    assert isinstance(exs[0].label, float)
    t = read_split(tmp_path / "glue", "STS-B", "test")
    assert (t[0].text_a, t[0].text_b, t[0].label) == ("A girl sings.", "A boy sings.", None)
    _write(d / "dev.tsv", [list(spec.splits["dev"].columns), ["0", *meta, "a", "b", "high"]])
    with pytest.raises(GlueDataError, match=r"dev\.tsv:2: non-numeric score 'high'"):
        read_split(tmp_path / "glue", "STS-B", "dev")


def test_synthetic_qqp_skips_short_rows(tmp_path: Path) -> None:
    d = tmp_path / "QQP"
    _write(d / "train.tsv", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                             ["0", "1", "2", "How do I cook?", "How to cook?", "1"],
                             ["1", "3", "4", "Broken row without label"],  # skipped, as the official processor
                             ["2", "5", "6", "Why?", "Why not?", "0"]])
    _write(d / "test.tsv", [["id", "question1", "question2"], ["0", "Who?", "Whom?"]])
    exs = read_split(d, "qqp", "train")
    assert [(e.text_a, e.text_b, e.label, e.line) for e in exs] == [
        ("How do I cook?", "How to cook?", 1, 2), ("Why?", "Why not?", 0, 4)]
    t = read_split(d, "QQP", "test")
    assert (t[0].text_a, t[0].text_b, t[0].label) == ("Who?", "Whom?", None)


def test_synthetic_mnli_splits(tmp_path: Path) -> None:
    spec = get_task("MNLI")
    d = tmp_path / "MNLI"
    parse = ["( a )", "( b )", "(ROOT a)", "(ROOT b)"]
    _write(d / "train.tsv", [list(spec.splits["train"].columns),
                             ["0", "31193", "31193n", "government", *parse, "Premise one.", "Hyp one.",
                              "neutral", "neutral"]])
    dev = [list(spec.splits["dev_matched"].columns),
           ["0", "63735", "63735n", "slate", *parse, "P m.", "H m.", "neutral", "entailment", "neutral",
            "neutral", "neutral", "neutral"],
           # a stray tab inside sentence2 -> 17 fields: label read from the right (official line[-1])
           ["1", "91383", "91383c", "slate", *parse, "P2.", "H2 part", "rest", "contradiction",
            "contradiction", "contradiction", "contradiction", "contradiction", "contradiction"]]
    _write(d / "dev_matched.tsv", dev)
    _write(d / "dev_mismatched.tsv", dev[:2])
    _write(d / "test_matched.tsv", [list(spec.splits["test_matched"].columns),
                                    ["0", "31", "31n", "fiction", *parse, "TP.", "TH."]])
    labels = spec.labels
    tr = read_split(tmp_path, "mnli", "train")
    assert (tr[0].text_a, tr[0].text_b, tr[0].label) == ("Premise one.", "Hyp one.", labels.index("neutral"))
    dm = read_split(tmp_path, "MNLI", "dev_matched")
    assert [(e.text_a, e.text_b, e.label) for e in dm] == [("P m.", "H m.", 1), ("P2.", "H2 part", 2)]
    assert len(read_split(tmp_path, "MNLI", "validation_mismatched")) == 1
    tm = read_split(tmp_path, "MNLI", "test_matched")
    assert (tm[0].text_a, tm[0].text_b, tm[0].label) == ("TP.", "TH.", None)
    with pytest.raises(GlueDataError, match="no split 'dev'"):
        read_split(tmp_path, "MNLI", "dev")
    with pytest.raises(GlueDataError) as ei:
        read_split(tmp_path, "MNLI", "test_mismatched")
    assert "\n" not in str(ei.value) and str(d / "test_mismatched.tsv") in str(ei.value)


def test_synthetic_rte_and_errors(tmp_path: Path) -> None:
    d = tmp_path / "glue_data" / "RTE"
    header = ["index", "sentence1", "sentence2", "label"]
    _write(d / "train.tsv", [header, ["0", "No Weapons \"of Mass Destruction Found.", "Weapons found.",
                                      "not_entailment"], ["1", "A dog ran.", "An animal ran.", "entailment"]],
           bom=True)
    exs = read_split(tmp_path / "glue_data", "rte", "train")
    assert [(e.text_a, e.label) for e in exs] == [("No Weapons \"of Mass Destruction Found.", 1),
                                                  ("A dog ran.", 0)]
    _write(d / "dev.tsv", [header, ["0", "a", "b", "entailment"], ["1", "only two fields"]])
    with pytest.raises(GlueDataError) as ei:
        read_split(d, "RTE", "dev")
    msg = str(ei.value)
    assert msg == f"{d / 'dev.tsv'}:3: expected 4 tab-separated fields, got 2"
    _write(d / "dev.tsv", [header, ["0", "a", "b", "entailment"], ["1", "a", "b", "maybe"]])
    with pytest.raises(GlueDataError, match=r"dev\.tsv:3: unknown label 'maybe' \(expected one of entailment"):
        read_split(d, "RTE", "dev")
    _write(d / "dev.tsv", [["index", "premise", "hypothesis", "label"], ["0", "a", "b", "entailment"]])
    with pytest.raises(GlueDataError, match=r"dev\.tsv:1: header has no column 'sentence1'"):
        read_split(d, "RTE", "dev")
    with pytest.raises(GlueDataError) as ei:
        read_split(d, "RTE", "test")
    assert "\n" not in str(ei.value) and str(d / "test.tsv") in str(ei.value)
    assert "present in" in str(ei.value) and "train.tsv" in str(ei.value)


def test_extra_fields_rejected_where_label_is_not_last(tmp_path: Path) -> None:
    d = tmp_path / "MRPC"
    _write(d / "dev.tsv", [["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                           ["1", "11", "12", "one", "two"], ["0", "13", "14", "three", "fo\tur"]], bom=True)
    with pytest.raises(GlueDataError, match=r"dev\.tsv:3: expected 5 tab-separated fields, got 6"):
        read_split(tmp_path, "MRPC", "dev")
    d = tmp_path / "CoLA"
    _write(d / "train.tsv", [["gj04", "1", "", "Fine."], ["gj04", "2", "*", "Bad label."]])
    with pytest.raises(GlueDataError, match=r"train\.tsv:2: unknown label '2'"):
        read_split(tmp_path, "CoLA", "train")


# ------------------------------------------------------------------------------------- hub


def test_load_hub_converts_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(hub_id: str, config: str, split: str) -> list[dict]:
        calls.append((hub_id, config, split))
        if config == "stsb":
            return [{"sentence1": "a", "sentence2": "b", "label": 3.8, "idx": 0}]
        return [{"premise": "P", "hypothesis": "H", "label": 2, "idx": 7},
                {"premise": "P2", "hypothesis": "H2", "label": -1, "idx": 8}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    exs = load_hub("mnli", "dev_mismatched")
    assert calls[-1] == ("nyu-mll/glue", "mnli", "validation_mismatched")
    assert [(e.guid, e.text_a, e.text_b, e.label) for e in exs] == [
        ("dev_mismatched-7", "P", "H", 2), ("dev_mismatched-8", "P2", "H2", None)]
    assert load_hub("STS-B", "train")[0].label == pytest.approx(3.8)


@pytest.mark.multiproc
def test_load_hub_offline_is_one_clear_line(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = ("from tcd_ds.data.glue import load_hub, GlueDataError\n"
            "try:\n    load_hub('cola', 'dev')\nexcept GlueDataError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ERR")]
    assert len(lines) == 1, out.stdout + out.stderr
    assert "could not load nyu-mll/glue/cola split 'validation'" in lines[0]
