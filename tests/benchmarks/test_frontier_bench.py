"""`hardbatch bench frontier --quick` runs the whole benchmark at CI size and writes what the
README and issue 10's bars read."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from hardbatch.trainer.distributed import JobConfig

from benchmarks import run_benchmark
from hardbatch.cli import main

TOP_KEYS = {"task", "workers", "seeds", "plain_best_accuracy", "targets", "speedup_at_best",
            "min_speedup_within_1pt", "speedup_vs_uniform_at_best", "plain_best_val_loss",
            "hardbatch_best_accuracy", "hardbatch_val_loss", "suspect_precision", "runs",
            "configs", "machine"}


def check_frontier(r: dict, metric: str, seeds: int) -> None:
    assert set(r) >= TOP_KEYS and r["metric"] == metric and r["seeds"] == seeds
    targets = [t["target"] for t in r["targets"]]
    keys = {"target", "speedup", *(f"{arm}_time_s" for arm in r["arms"])}
    assert len(targets) == 11 and all(set(t) >= keys for t in r["targets"])
    worse = sorted(targets, reverse=(metric == "accuracy"))
    assert targets == worse  # from the best plain median to one point (2%) worse
    best = r["plain_best_accuracy"] if metric == "accuracy" else r["plain_best_val_loss"]
    assert targets[0] == pytest.approx(best)
    for t in r["targets"]:
        assert t["plain_time_s"] is not None  # plain reaches its own best median and below
        if t["hardbatch_time_s"] is None:
            assert t["speedup"] is None
        else:
            assert t["speedup"] == pytest.approx(t["plain_time_s"] / t["hardbatch_time_s"])
    speedups = [t["speedup"] or 0.0 for t in r["targets"]]
    assert r["min_speedup_within_1pt"] == pytest.approx(min(speedups))
    assert r["speedup_at_best"] == r["targets"][0]["speedup"]
    for key in ("plain_best_accuracy", "hardbatch_best_accuracy"):
        assert 0.0 < r[key] <= 1.0
    assert r["plain_best_val_loss"] > 0 and r["hardbatch_val_loss"] > 0
    # every config ran for every seed; curves are per seed, in training time order
    assert len(r["runs"]) == seeds * len(r["configs"])
    for run in r["runs"]:
        times = [e["train_time_s"] for e in run["evals"]]
        assert times == sorted(times) and times[0] > 0
        assert len(run["epoch_metrics"]) == run["epochs"]
    for c in r["configs"].values():
        assert c["final_accuracy"]["min"] <= c["final_accuracy"]["median"] \
            <= c["final_accuracy"]["max"]


def test_quick_frontier_on_mnist1d_in_one_process(tmp_path):
    # One learning rate: every arm here; the grid is the sequence test's.
    r = run_benchmark("frontier", quick=True, out=tmp_path, lr_factors=[1.0])
    saved = json.loads((tmp_path / "frontier.json").read_text())
    assert saved["speedup_at_best"] == r["speedup_at_best"]
    check_frontier(saved, "accuracy", seeds=2)
    assert saved["arms"] == ["plain", "hardbatch", "uniform", "half", "half_weighted",
                             "half_uniform", "half_uncertain", "cost_model", "no_gate",
                             "no_guard", "steps40", "steps40_uniform", "fixed_size",
                             "unpacked", "no_filter", "no_curve", "curve"]
    assert saved["workers"] == 1 and saved["task_name"] == "mnist1d"
    # every composition against its same-size uniform control
    assert [(v["arm"], v["control"]) for v in saved["composition"]] == [
        ("hardbatch", "uniform"), ("half", "half_uniform"), ("half_weighted", "half_uniform"),
        ("half_uncertain", "half_uniform"), ("steps40", "steps40_uniform")]
    assert all(len(v["speedups"]) == 11 for v in saved["composition"])
    assert saved["plain_best_accuracy"] > 0.2  # ten classes: it learned something
    # how the headline figures move with the seeds: every resample of 2 seeds, and the
    # point figure is one of them (both seeds once)
    spread = saved["seed_spread"]
    assert spread["resamples"] == 4
    for key in ("speedup_at_best", "min_speedup_within_1pt", "speedup_vs_uniform_at_best"):
        lo, hi = spread[key]["p10"], spread[key]["p90"]  # None: uniform never got there
        assert lo is None or hi is None or lo <= hi
    from benchmarks.frontier import respread
    assert respread(saved) == spread
    # interleaved: within a seed hardbatch runs come between plain ones, and each seed starts
    # at another config
    arms = [run["arm"] for run in saved["runs"]]
    per_seed = len(arms) // 2
    for seed_arms in (arms[:per_seed], arms[per_seed:]):
        assert seed_arms.index("hardbatch") < len(seed_arms) - 1 - seed_arms[::-1].index("plain")
    assert saved["runs"][0]["config"] != saved["runs"][per_seed]["config"]
    # the hardbatch arms are the defaults a user gets; an ablation equal to them is flagged
    d = JobConfig()
    assert saved["hardbatch_config"]["plan_fraction"] == d.plan_fraction
    assert saved["hardbatch_config"]["alpha"] == d.alpha
    assert saved["ablations"]["half"]["same_as_default"] == (d.plan_fraction == 0.5
                                                             and d.beta == 0.0)
    # Without the gate every run filters some steps; the gate may keep a quick run's small
    # model on full steps throughout (its kept share stays high), and then trains all of it.
    no_gate = [run for run in saved["runs"] if run["arm"] == "no_gate"]
    assert no_gate and all(run["run"] and min(e["samp_perc"] for e in run["epoch_metrics"]) < 1
                           for run in no_gate)
    for run in (run for run in saved["runs"] if run["arm"] == "hardbatch"):
        assert run["run"]
        for e in run["epoch_metrics"]:
            assert e["filter_steps"] > 0 or e["samp_perc"] == 1.0
    assert saved["ablations"]["cost_model"] == {"overrides": {"cost_model": True},
                                                 "same_as_default": d.cost_model}
    assert saved["ablations"]["half_weighted"]["overrides"] == {"size_factor": 0.0,
                                                                "plan_fraction": 0.5,
                                                                "beta": 1.0}
    # budgets are passes: plans over half the data train twice the epochs
    half = {run["passes"]: run["epochs"] for run in saved["runs"] if run["arm"] == "half"}
    assert half and all(e == 2 * p for p, e in half.items())
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "frontier.png", "frontier_accuracy.png", "frontier_loss.png"}


def test_quick_frontier_on_noisy_tabular_reports_the_suspect_listing_or_its_absence(tmp_path):
    r = run_benchmark("frontier", quick=True, out=tmp_path, task="tabular",
                      task_args={"noise": "0.2"}, seeds=1)
    check_frontier(r, "accuracy", seeds=1)
    assert r["task_args"] == {"noise": "0.2"}
    # The listing was read; whether a quick run scores samples often enough to flag any
    # depends on when the service last rebuilt its guard.
    assert r["flipped_labels"] == 400 and r["suspects"]
    if r["suspect_precision"] is None:
        assert "listed no suspects" in r["suspect_note"]
        assert all(s["listed"] == 0 for s in r["suspects"])
    else:
        assert 0.0 <= r["suspect_precision"] <= 1.0


def test_quick_frontier_on_the_sequence_task_targets_validation_loss(tmp_path):
    r = run_benchmark("frontier", quick=True, out=tmp_path, task="sequence", seeds=1,
                      ablations=["uniform"])
    check_frontier(r, "val_loss", seeds=1)
    assert r["suspect_precision"] is None
    # only the ablation asked for: its runs, figures and plots; the others nowhere
    assert r["arms"] == ["plain", "hardbatch", "uniform"] and list(r["ablations"]) == ["uniform"]
    assert {run["arm"] for run in r["runs"]} == {"plain", "hardbatch", "uniform"}
    assert all("half_time_s" not in t and "uniform_time_s" in t for t in r["targets"])
    # The learning-rate grid: every arm at each rate, each side scored at its best config
    # per target, and what each run trained is on record.
    assert r["lr_factors"] == [1.0, 2.0]
    d = JobConfig()
    for arm in ("plain", "hardbatch"):
        assert {run["lr"] for run in r["runs"] if run["arm"] == arm} == {d.lr, 2 * d.lr}
    # an ablation isolates its component at the default rate
    assert {run["lr"] for run in r["runs"] if run["arm"] == "uniform"} == {d.lr}
    assert all(t["best_config"]["plain"]["config"] in r["configs"] for t in r["targets"])
    for run in r["runs"]:
        assert run["lr_used"] == run["lr"] and len(run["steps_per_epoch"]) == run["epochs"]
        assert run["samples_trained"] > 0 and "a" in run["step_cost"]
    packed = [run for run in r["runs"] if run["arm"] == "hardbatch"]
    assert all(run["samples_trained"] <= 2_000 * run["epochs"] for run in packed)


@pytest.mark.slow
def test_quick_frontier_on_two_ray_workers(tmp_path):
    # One ablation: each Ray Train run costs ~25 s of start-up here, and all 12 arms (25 runs)
    # outlasted the 10-minute test timeout in CI; the one-process test covers every arm.
    r = run_benchmark("frontier", quick=True, out=tmp_path, workers=2, seeds=1,
                      ablations=["uniform"])
    check_frontier(r, "accuracy", seeds=1)
    assert r["workers"] == 2 and set(r["arms"]) == {"plain", "hardbatch", "uniform"}
    # plain DDP also at one process's global batch (64 per worker, the same steps)
    batches = {run["batch_size_used"] for run in r["runs"] if run["arm"] == "plain"}
    assert batches == {128, 64}


@pytest.mark.parametrize("args, message", [
    (["ingest", "--workers", "2"], "does not take workers"),
    (["frontier", "--task-arg", "noise"], "expected KEY=VALUE"),
    (["frontier", "--task", "nope"], "task must be one of"),
    (["frontier", "--workers", "0"], "0 is not in the range"),
    (["frontier", "--ablations", "uniform,nope"], "unknown ablations ['nope']"),
    (["frontier", "--budgets", "2,x"], "expected numbers separated by commas"),
    (["frontier", "--lrs", "0,1"], "learning-rate factors > 0"),
])
def test_bench_options_are_checked_before_anything_runs(args, message, tmp_path):
    result = CliRunner().invoke(main, ["bench", *args, "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output, result.output
