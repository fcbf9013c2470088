"""The premise study (`tcd_ds.premise`): P1's rule read off the runs' eval curves, and a real run."""
import dataclasses
import json
from pathlib import Path

import pytest

from tcd_ds import premise

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rc(seeds=(1, 2)):
    return dataclasses.asdict(premise.PremiseConfig(
        model_recipe="tiny", pretrain={"train": {"max_steps": 20}}, seeds=list(seeds),
        variants={"vanilla": {"model": {"moe": {"num_experts": 0}}}, "moe4": {"model": {"moe": {"num_experts": 4}}}}
    ).validate())


def _curve(out: Path, run: str, points: dict[int, float]) -> None:
    d = out / "runs" / run
    d.mkdir(parents=True)
    rows = [{"kind": "train", "step": 1, "loss": 9.0}] + [
        {"kind": "eval", "step": s, "val": {"mlm_loss": v, "accuracy": 0.1}} for s, v in points.items()]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_p1_is_met_only_when_the_gap_exceeds_the_seed_spread(tmp_path):
    _curve(tmp_path, "vanilla-seed1", {10: 6.0, 20: 5.00})
    _curve(tmp_path, "vanilla-seed2", {10: 6.1, 20: 5.04})
    _curve(tmp_path, "moe4-seed1", {10: 5.9, 20: 4.90})
    _curve(tmp_path, "moe4-seed2", {10: 5.8, 20: 4.95})
    res = premise.analyze(_rc(), tmp_path)["variants"]["moe4"]
    assert res["step"] == 20 and res["val_mlm"] == [4.90, 4.95]
    assert res["p1"]["gap"] == pytest.approx(5.02 - 4.925)
    assert res["p1"]["spread"] == pytest.approx(0.05) and res["p1"]["met"] is True
    # a wider seed spread than the gap: not met
    (tmp_path / "runs" / "vanilla-seed2" / "metrics.jsonl").unlink()
    (tmp_path / "runs" / "vanilla-seed2").rmdir()
    _curve(tmp_path, "vanilla-seed2", {10: 6.1, 20: 5.20})
    res = premise.analyze(_rc(), tmp_path)["variants"]["moe4"]
    assert res["p1"]["spread"] == pytest.approx(0.20) and res["p1"]["met"] is False


def test_p1_compares_at_the_last_step_every_run_reached_and_needs_two_seeds(tmp_path):
    _curve(tmp_path, "vanilla-seed1", {10: 6.0, 20: 5.0})
    _curve(tmp_path, "moe4-seed1", {10: 5.0})  # still training
    res = premise.analyze(_rc(seeds=(1,)), tmp_path)["variants"]["moe4"]
    assert res["step"] == 10 and res["gap_to_reference"] == pytest.approx(1.0)
    assert res["p1"]["met"] is None and res["p1"]["spread"] is None  # one seed: no spread measured
    report = premise.report(_rc(seeds=(1,)), premise.analyze(_rc(seeds=(1,)), tmp_path), "cmd")
    assert "no verdict (one seed)" in report and "| moe4 | 4 | 1 | 10 |" in report


def test_a_typo_in_a_variant_is_refused_before_any_run(tmp_path):
    recipe = tmp_path / "p.yaml"
    recipe.write_text("model_recipe: tiny\nvariants: {vanilla: {}, moe4: {model: {moe: {num_experts: 4, top_kk: 1}}}}\n")
    with pytest.raises(SystemExit) as err:
        premise.main([str(recipe), "--out", str(tmp_path / "out")])
    assert err.value.code == 2 and not (tmp_path / "out" / "runs").exists()


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data (the Wikipedia extract)")
def test_a_small_study_trains_every_variant_and_reports(tmp_path):
    recipe = tmp_path / "p.yaml"
    recipe.write_text(
        "model_recipe: tiny\nranks: 1\nthreads: 1\njobs: 2\nds_config: ds_configs/cpu_zero0.json\n"
        "pretrain: {data: {max_documents: 40, eval_max_sequences: 16, eval_corpora: ''},\n"
        "           train: {max_steps: 4, micro_batch_size: 4, warmup_steps: 1, log_every: 2, eval_every: 2,\n"
        "                   eval_batches: 2, save_every: 2}}\n"
        "variants: {vanilla: {}, moe4: {model: {moe: {num_experts: 4}}}}\nseeds: [1]\n"
        f"glue: {{dir: {SHARED / 'glue'}, tasks: [MRPC], seeds: [1, 2], epochs: 1, max_train_examples: 16,\n"
        "       max_eval_examples: 16, max_seq_len: 32, batch_size: 8}\n")
    out = tmp_path / "out"
    results = premise.main([str(recipe), "--out", str(out)])
    assert {r["finished"] for r in results["runs"].values()} == {True}
    assert [s for s, _ in results["runs"]["moe4-seed1"]["val_curve"]] == [2, 4]
    assert results["variants"]["moe4"]["step"] == 4 and results["variants"]["moe4"]["num_experts"] == 4
    assert json.loads((out / "results.json").read_text())["variants"]["moe4"]["mean"] == results["variants"]["moe4"]["mean"]
    assert "| moe4 | 4 | 1 | 4 |" in (out / "report.md").read_text()
    # P2: the best (only) variant and the reference at matched loss, each fine-tuned with both seeds
    pair = results["transfer"]["moe4"]["pairs"][0]
    assert set(pair["models"]) == {"vanilla", "moe4"} and pair["seed"] == 1
    assert {m["source"] for m in pair["models"].values()} <= {"export", "checkpoint"}
    behind = max(pair["models"].values(), key=lambda m: m["val"])
    assert behind["source"] == "export" and behind["step"] == 4
    assert all(len(m["glue_avg"]) == 2 for m in pair["models"].values())
    assert results["transfer"]["moe4"]["p2_met"] in (True, False)
    assert "## P2: transfer at matched val MLM loss" in (out / "report.md").read_text()
    again = premise.main([str(recipe), "--out", str(out)])  # finished runs are skipped, the figures stay
    assert again["variants"] == results["variants"]


def test_variants_restricts_what_this_invocation_trains(tmp_path):
    rc = premise.load("small")[1]
    assert [r[0] for r in premise.plan(rc, ["moe16"])] == ["vanilla-seed1", "vanilla-seed2", "moe16-seed1",
                                                           "moe16-seed2"]
    assert len(premise.plan(rc)) == 2 * len(rc["variants"])
    with pytest.raises(SystemExit) as err:
        premise.main(["small", "--out", str(tmp_path), "--variants", "moe7"])
    assert err.value.code == 2 and not (tmp_path / "runs").exists()


def test_the_committed_premise_results_recompute_from_their_runs():
    """docs/results/premise/results.json: each variant's figures are its runs' val curves at the compared
    step (plain arithmetic), every run is scored with the one eval_seed, and the P1 verdict follows the
    rule from those figures."""
    path = Path(__file__).resolve().parents[1] / "docs" / "results" / "premise" / "results.json"
    res = json.loads(path.read_text())
    ref = res["reference"]
    assert {r["eval_seed"] for r in res["runs"].values()} == {res["eval_seed"]}
    for name, v in res["variants"].items():
        if not v.get("step"):
            continue
        def at_step(variant):  # val_curve: [step, val MLM] pairs
            return [dict(r["val_curve"])[v["step"]] for r in res["runs"].values() if r["variant"] == variant]

        mine, theirs = at_step(name), at_step(ref)
        assert v["val_mlm"] == pytest.approx(mine) and v["mean"] == pytest.approx(sum(mine) / len(mine))
        if name == ref:
            continue
        gap = sum(theirs) / len(theirs) - sum(mine) / len(mine)
        assert v["p1"]["gap"] == pytest.approx(gap)
        spread = max(max(mine) - min(mine), max(theirs) - min(theirs))
        assert v["p1"]["met"] is (gap > spread)
    assert (Path(path).parent / "report.md").read_text().count("| moe8 | 8 | 2 | 3000 |") == 1
