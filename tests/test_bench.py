"""The benchmark suite's quick mode (`python -m tcd_ds.bench --quick`), run in-process (the scaling
section launches the real trainer): every section and every variant row is there, times are positive,
numbers finite, and the markdown report has every section. No timing assertions."""
from __future__ import annotations

import json
import math

import pytest

from tcd_ds.bench import __main__ as suite


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = suite.main(["--quick", "--out", str(out / "perf.json"), "--markdown", str(out / "perf.md")])
    assert rc == 0
    return json.loads((out / "perf.json").read_text()), (out / "perf.md").read_text()


def _finite_numbers(x, where="result"):
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return
    if isinstance(x, (int, float)):
        assert math.isfinite(x), where
    elif isinstance(x, dict):
        for k, v in x.items():
            _finite_numbers(v, f"{where}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _finite_numbers(v, f"{where}[{i}]")


@pytest.mark.slow
@pytest.mark.multiproc
def test_every_section_present_and_finite(quick):
    result, _ = quick
    assert set(result["sections"]) == set(suite.SECTIONS)
    assert result["quick"] is True
    for key in ("cpu_model", "cpu_count", "torch", "torch_threads", "platform"):
        assert result["machine"][key] not in (None, "")
    _finite_numbers(result)
    for name, sec in result["sections"].items():
        assert sec["rows"], name
        assert "| " in sec["table"] and sec["title"], name


@pytest.mark.slow
@pytest.mark.multiproc
def test_relation_rows(quick):
    from tcd_ds.bench import relation

    rows = quick[0]["sections"]["relation"]["rows"]
    cases = {(L, d) for L in relation.QUICK["seq_lens"] for d in relation.QUICK["dims"]}
    assert {(r["seq_len"], r["dim"], r["variant"]) for r in rows} == {c + (v,) for c in cases for v in relation.VARIANTS}
    for r in rows:
        assert r["median_ms"] > 0 and r["min_ms"] > 0 and r["peak_mib"] >= 0 and r["impl"] in ("naive", "gram")


@pytest.mark.slow
@pytest.mark.multiproc
def test_moe_rows(quick):
    from tcd_ds.bench import moe

    rows = quick[0]["sections"]["moe"]["rows"]
    for shape in moe.QUICK["shapes"]:
        for e in moe.QUICK["experts"]:
            got = [r["variant"] for r in rows if r["shape"] == shape and r["case_experts"] == e]
            assert sorted(got) == sorted(["dense", *moe.BACKENDS])
    for r in rows:
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and r["x_dense"] > 0
        else:
            assert r["status"] == "skipped" and r["skip_reason"]
    ok = {r["variant"] for r in rows if r["status"] == "ok"}
    assert {"dense", "torch", "grouped", "deepspeed"} <= ok


@pytest.mark.slow
@pytest.mark.multiproc
def test_step_rows(quick):
    from tcd_ds.bench import step

    sec = quick[0]["sections"]["step"]
    for recipe in step.QUICK["recipes"]:
        assert {r["variant"] for r in sec["rows"] if r["recipe"] == recipe} == set(step.VARIANTS)
    for r in sec["rows"]:
        assert r["median_ms"] > 0 and r["tokens_per_second"] > 0 and r["mfu"] > 0
    for info in sec["info"]:
        assert all(p > 0 for p in info["matmul_peak_gflops"]) and info["tap_pairs"] > 0


@pytest.mark.slow
@pytest.mark.multiproc
def test_scaling_rows(quick):
    rows = quick[0]["sections"]["scaling"]["rows"]
    assert [r["ranks"] for r in rows] == [1, 2]
    assert [r["world_size"] for r in rows] == [1, 2]
    for r in rows:
        assert r["tokens_per_second"] > 0 and r["steps"] > 0


@pytest.mark.slow
@pytest.mark.multiproc
def test_peer_rows(quick):
    rows = quick[0]["sections"]["peer"]["rows"]
    assert {r["variant"] for r in rows} == {"tcd-ds vanilla", "transformers BertForMaskedLM"}
    for r in rows:
        assert r["median_ms"] > 0 and r["tokens_per_second"] > 0
        if r["variant"] == "tcd-ds vanilla":  # the MLM head sees the masked positions only
            assert r["head_rows"] == r["masked_tokens"]
        else:
            assert r["head_rows"] == r["batch"] * r["seq_len"]


@pytest.mark.slow
@pytest.mark.multiproc
def test_markdown_has_every_section(quick):
    result, md = quick
    assert md.startswith("# tcd-ds performance")
    assert "## Targets" in md and "python -m tcd_ds.bench" in md
    assert result["machine"]["cpu_model"] in md
    for sec in result["sections"].values():
        assert f"## {sec['title']}" in md
        assert sec["table"].splitlines()[0] in md


def test_unknown_section_is_an_error(capsys):
    assert suite.main(["--quick", "--only", "relation,nope"]) == 2
    assert "unknown section" in capsys.readouterr().err
