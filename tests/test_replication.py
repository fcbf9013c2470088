"""The pre-registered replication (`tcd_ds.replication`): its statistics from the seeds' results."""
import dataclasses
import json
import statistics

import pytest

from tcd_ds import replication
from tcd_ds.compare import t_quantile


def _rc(**kw):
    return dataclasses.asdict(replication.ReplicationConfig(**kw).validate())


def _seed_results(out, seed, student, aligned, baseline, teacher, mlm):
    """An experiment's results.json with these per-fine-tuning-seed GLUE averages and val MLM losses."""
    d = out / f"seed-{seed}"
    d.mkdir(parents=True)
    models = {key: {"val_mlm_loss": mlm[key], "glue_avg": avg, "glue": {}} for key, avg in
              (("tcd", student), ("baseline_aligned", aligned), ("baseline", baseline), ("teacher", teacher))}
    (d / "results.json").write_text(json.dumps({"models": {**models, "random_init": {"glue_avg": [1.0]}}}))


def test_the_primary_statistic_is_the_t_interval_of_per_seed_differences(tmp_path):
    rc = _rc(pretrain_seeds=[1, 2, 3, 4])
    mlm = {"tcd": 4.0, "baseline_aligned": 4.0, "baseline": 4.1, "teacher": 3.9}
    _seed_results(tmp_path, 1, [60, 62], [59, 59], [58, 58], [61, 61], mlm)  # student - aligned: +2
    _seed_results(tmp_path, 2, [60, 60], [60, 59], [59, 59], [60, 60], {**mlm, "baseline": 4.2})  # +0.5
    _seed_results(tmp_path, 3, [61, 61, 61], [60, 61, 62], [60, 60], [61, 62], {**mlm, "baseline": 4.05})  # 0
    res = replication.analyze(rc, tmp_path)  # seed 4 has not run: left out
    diffs = [2.0, 0.5, 0.0]
    assert [e["pretrain_seed"] for e in res["per_seed"]] == [1, 2, 3]
    assert [e["student_minus_aligned"] for e in res["per_seed"]] == pytest.approx(diffs)
    half = t_quantile(0.975, 2) * statistics.stdev(diffs) / 3 ** 0.5
    assert res["primary"]["mean"] == pytest.approx(statistics.mean(diffs)) and res["primary"]["df"] == 2
    assert res["primary"]["ci95"] == pytest.approx([statistics.mean(diffs) - half, statistics.mean(diffs) + half])
    assert res["primary"]["statistic"] == replication.PRIMARY
    # the check the issue asks for: the primary statistic recomputes from per_seed alone, to 0.01
    again = [statistics.mean(e["models"]["student"]["glue_avg"]) - statistics.mean(e["models"]["aligned"]["glue_avg"])
             for e in res["per_seed"]]
    assert abs(statistics.mean(again) - res["primary"]["mean"]) < 0.01
    assert {e["eval_seed"] for e in res["per_seed"]} == {1}
    sec = res["secondary"]["student_minus_baseline"]
    assert sec["mlm_gap"] == pytest.approx([0.1, 0.2, 0.05])
    assert sec["mean"] == pytest.approx(statistics.mean([3.0, 1.0, 1.0]))
    assert sec["slope_per_nat"] == pytest.approx(replication.slope([0.1, 0.2, 0.05], [3.0, 1.0, 1.0]))
    mde = (t_quantile(0.975, 2) + t_quantile(0.8, 2)) * statistics.stdev(diffs) / 3 ** 0.5
    assert res["mde"]["points"] == pytest.approx(mde) and res["mde"]["k"] == 3
    text = replication.report(rc, res, "cmd")
    assert "contains 0, no evidence either way" in text and "over 3 pre-training seeds" in text


def test_one_seed_gives_no_interval_and_the_reading_follows_the_interval():
    assert replication.over_seeds([1.0], "s")["ci95"] is None
    assert "not measured yet" in replication.reading({"ci95": None})
    assert "above 0" in replication.reading({"mean": 1.0, "ci95": [0.2, 1.8], "df": 4})
    assert "below 0" in replication.reading({"mean": -1.0, "ci95": [-1.8, -0.2], "df": 4})
    assert replication.slope([1.0, 2.0], [1.0, 2.0]) is None  # two points: no slope reported
    assert replication.slope([0.0, 1.0, 2.0], [1.0, 3.0, 5.0]) == pytest.approx(2.0)


def test_each_seed_runs_the_experiment_with_its_seed_and_the_one_eval_seed(tmp_path):
    rc = _rc(overrides=["pretrain.model.moe.num_experts=8"], eval_seed=7)
    argv = replication.seed_argv(rc, tmp_path, 3)
    assert argv[:3] == ["small", "--out", str(tmp_path / "seed-3")]
    assert argv[-3:] == ["pretrain.model.moe.num_experts=8", "pretrain.seed=3", "pretrain.data.eval_seed=7"]
    for bad in (["pretrain.seed=5"], ["pretrain.data.eval_seed=2"]):
        with pytest.raises(Exception, match="leave pretrain.seed"):
            _rc(overrides=bad)
    with pytest.raises(Exception, match="pre-registered"):
        _rc(primary="whatever turns out significant")
    with pytest.raises(Exception, match=">= 2 distinct seeds"):
        _rc(pretrain_seeds=[1])


def test_the_packaged_recipe_gives_each_seed_a_valid_experiment(tmp_path):
    """Every seed's experiment loads with the recipe's overrides (a typo fails here, not after a teacher)."""
    from tcd_ds import experiments

    _, rc = replication.load("small")
    assert len(rc["pretrain_seeds"]) >= 5 and rc["primary"] == replication.PRIMARY
    for seed in rc["pretrain_seeds"]:
        argv = replication.seed_argv(rc, tmp_path, seed)
        name, exp = experiments.load(argv[0], argv[5:])
        assert str(exp["pretrain"]["seed"]) == str(seed) and str(exp["pretrain"]["data"]["eval_seed"]) == "1"
        assert len(exp["glue"]["lrs"]) >= 2 and len(exp["glue"]["per_task"]["SST-2"]["lrs"]) >= 2
