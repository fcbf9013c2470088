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
        if sec.get("status") == "skipped":  # finetune without ../shared/data: says why
            assert name == "finetune" and "real data not found" in sec["skip_reason"], sec
            continue
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


@pytest.mark.slow
@pytest.mark.multiproc
def test_finetune_rows(quick, shared_data):
    from tcd_ds.bench import finetune

    sec = quick[0]["sections"]["finetune"]
    rows = sec["rows"]
    assert {(r["recipe"], r["mode"], r["variant"]) for r in rows} == \
        {(rc, m, v) for rc in finetune.QUICK["recipes"] for m in ("vanilla", "moe") for v in finetune.VARIANTS}
    for r in rows:
        assert r["examples"] == finetune.QUICK["examples"] and r["examples_per_second"] > 0
        assert r["real_tokens"] > r["examples"] * 3  # real sentences, not empty rows
    assert not sec["targets"]  # the SST-2 target is the small MoE's, not in the quick run


@pytest.mark.slow
@pytest.mark.multiproc
def test_trainer_rows(quick):
    from tcd_ds.bench import trainer

    sec = quick[0]["sections"]["trainer"]
    rows = sec["rows"]
    assert [(r["variant"], r["mode"]) for r in rows if r["dtype"] == "fp32"] == [x[:2] for x in trainer.RUNS]
    assert "fp32" in sec["matmul_peaks_gflops"]
    for r in rows:
        assert r["world_size"] == 2 and r["tokens_per_second"] > 0 and r["mfu_fp32"] > 0
        ph = r["phases_s"]
        assert ph["student"] > 0 and ph["backward"] > 0 and ph["optimizer"] > 0, r
        # only TCD runs a teacher and relation losses
        assert (ph["teacher"] > 0 and ph["relation"] > 0) == (r["mode"] == "tcd"), r


@pytest.mark.slow
@pytest.mark.multiproc
def test_trainer_one_rank_rows(quick):
    """The experiments' setting: python -m tcd_ds.train on one rank, `auto` picking a stage-0 config."""
    from tcd_ds import hardware
    from tcd_ds.bench import trainer

    sec = quick[0]["sections"]["trainer"]
    rows = sec["one_rank_rows"]
    assert [r["variant"] for r in rows] == [x[0] for x in trainer.ONE_RANK_RUNS] + [trainer.ONE_RANK_BEFORE[0]]
    assert sec["memory_bandwidth_gbs_1_thread"] > 0
    for r in rows:
        assert r["tokens_per_second"] > 0 and r["phases_s"]["student"] > 0 and r["phases_s"]["optimizer"] > 0, r
        assert (r["phases_s"]["teacher"] > 0) == (r["mode"] == "tcd"), r
        want = (hardware.cpu_ds_config(moe=False, ranks=2) if r["variant"] == trainer.ONE_RANK_BEFORE[0]
                else hardware.cpu_ds_config(moe=r["mode"] != "vanilla", ranks=1))
        assert r["ds_config"] == want.rsplit("/", 1)[1], r
    assert any(n.startswith("1 rank, before and after") for n in sec["notes"])


def test_one_rank_targets_are_the_ratios_of_one_run():
    from tcd_ds.bench import trainer

    def row(name, tps, **phases):
        return {"variant": name, "dtype": "fp32", "tokens_per_second": tps, "parameters": 10_000_000,
                "phases_s": {p: phases.get(p, 0.0) for p in trainer.PHASES}}

    rows = [row("vanilla", 1000.0, student=0.1, backward=0.2), row("moe", 600.0, student=0.15, backward=0.3, optimizer=0.05),
            row("tcd", 450.0, student=0.15, teacher=0.05, relation=0.1, backward=0.35, optimizer=0.05),
            row("moe, 8 experts", 900.0, student=0.1, backward=0.2)]
    got = {t["target"]: t for t in trainer.one_rank_targets(rows, {"fp32": 100.0}, 10.0)}
    name = "trainer, small, 1 rank x 1 thread, 8k vocab"
    assert got[f"{name}: MoE / vanilla tokens/s"]["value"] == pytest.approx(0.6)
    assert got[f"{name}: MoE / vanilla tokens/s"]["met"] is True
    tcd = got[f"{name}: TCD / MoE tokens/s"]
    assert tcd["value"] == pytest.approx(0.75) and tcd["met"] is False
    assert "adds 0.200 s a step to MoE's 0.500" in tcd["bound"] and "bounds the ratio at 0.91" in tcd["bound"]
    assert got[f"{name}, 8 experts: MoE / vanilla tokens/s"]["value"] == pytest.approx(0.9)
    assert trainer.one_rank_targets(rows[:3], {"fp32": 100.0}, 10.0) == []


def _fake_section(name, value):
    return {"name": name, "title": name.title(), "rows": [{"x": value}], "table": f"| {name} |", "notes": [],
            "wall_s": 1.0, "loadavg_before": None, "loadavg_after": None,
            "targets": [{"target": f"{name} target", "value": value, "value_min": None, "threshold": 1.0,
                         "op": ">=", "unit": "", "met": value >= 1.0, "bound": ""}]}


def test_merge_keeps_sections_not_rerun_and_replaces_those_rerun():
    machine = {"cpu_model": "Old CPU", "isa": ["avx2"], "cpu_count": 2}
    old = {"started": "2026-01-01T00:00:00+00:00", "machine": machine,
           "sections": {"peer": _fake_section("peer", 3.0), "relation": _fake_section("relation", 0.5)}}
    new = {"started": "2026-02-02T00:00:00+00:00", "machine": dict(machine, cpu_model="New CPU"),
           "sections": {"relation": _fake_section("relation", 2.0)}, "targets": []}
    merged = suite.merge(old, new)
    assert list(merged["sections"]) == ["relation", "peer"]  # suite order
    assert merged["sections"]["relation"]["rows"] == [{"x": 2.0}]  # re-run: the new one
    assert merged["sections"]["peer"]["started"] == "2026-01-01T00:00:00+00:00"
    assert [(t["section"], t["value"]) for t in merged["targets"]] == [("relation", 2.0), ("peer", 3.0)]
    md = suite.markdown(dict(merged, quick=False, command=None, wall_s=2.0,
                             machine=dict(new["machine"], platform="p", cpus_usable=2, python="3", torch="t",
                                          deepspeed="d", transformers="x", torch_threads=1, loadavg_1_5_15=[0.0])))
    assert "on Old CPU (avx2), 2 CPUs" in md.split("## Peer")[1]  # a kept section names its machine


def test_merge_needs_an_existing_results_json(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        suite.main(["--quick", "--only", "relation", "--merge", "--out", str(tmp_path / "none.json")])
    assert err.value.code == 2 and "--merge needs --out" in capsys.readouterr().err


def test_unknown_section_is_an_error(capsys):
    assert suite.main(["--quick", "--only", "relation,nope"]) == 2
    assert "unknown section" in capsys.readouterr().err


def test_the_report_names_no_machine_paths():
    """Commands in docs/performance.* named this machine's interpreter, launcher, data and repo paths."""
    import shutil
    import sys

    from tcd_ds.bench.__main__ import portable
    from tcd_ds.resources import ROOT

    text = (f"`{sys.executable} -m tcd_ds.train data.corpus={ROOT.parent / 'shared' / 'data' / 'x'} "
            f"data.cache_dir={ROOT / '.cache'} run_dir=/tmp/tcd-bench-trainer1-ab_c9/moe`")
    if shutil.which("deepspeed"):
        text += f" `{shutil.which('deepspeed')} --num_accelerators 2`"
    out = portable(text)
    assert "python -m tcd_ds.train data.corpus=../shared/data/x data.cache_dir=.cache run_dir=<tmp>/moe" in out
    assert str(ROOT) not in out and sys.executable not in out
