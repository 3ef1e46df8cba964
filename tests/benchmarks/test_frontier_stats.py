"""The frontier's arithmetic, on hand-made curves."""

from __future__ import annotations

import math

import pytest

from benchmarks import frontier_stats as st


def curve(*points: tuple[float, float]) -> list[dict[str, float]]:
    return [{"train_time_s": t, "val_accuracy": a, "val_loss": 1 - a} for t, a in points]


def test_half_time_is_the_median_with_never_counted_last():
    assert st.half_time([3.0, 1.0, 2.0]) == 2.0
    assert st.half_time([None, 1.0, 2.0]) == 2.0  # one seed of three never: still a time
    assert st.half_time([None, None, 2.0]) is None  # more than half never: never
    assert st.half_time([4.0, None]) == 4.0  # half of an even count reached it
    assert st.half_time([]) is None


def test_time_to_interpolates_the_first_crossing_for_either_metric():
    c = curve((1.0, 0.5), (2.0, 0.8), (3.0, 0.7), (4.0, 0.9))
    assert st.time_to(c, 0.8, "accuracy") == 2.0
    assert st.time_to(c, 0.6, "accuracy") == pytest.approx(1 + 1 / 3)  # between 1 s and 2 s
    assert st.time_to(c, 0.4, "accuracy") == 1.0  # reached at the first eval: its time
    assert st.time_to(c, 0.95, "accuracy") is None
    # loss 0.2 at 2 s, 0.3 at 3 s, 0.1 at 4 s: 0.15 is crossed between 3 s and 4 s
    assert st.time_to(c, 0.15, "val_loss") == pytest.approx(3.75)


def test_targets_span_one_point_down_or_two_percent_of_loss_up():
    acc = st.targets_from(0.99, "accuracy")
    assert len(acc) == 11 and acc[0] == 0.99 and acc[-1] == pytest.approx(0.98)
    loss = st.targets_from(2.0, "val_loss")
    assert loss[0] == 2.0 and loss[-1] == pytest.approx(2.04)


def test_fastest_takes_the_best_half_time_over_configs():
    curves = {
        "short": [curve((1.0, 0.9)), curve((1.2, 0.85)), curve((1.1, 0.91))],
        "long": [curve((1.0, 0.8), (3.0, 0.95)), curve((1.0, 0.8), (3.5, 0.95)),
                 curve((1.0, 0.8), (2.5, 0.95))],
    }
    # 0.92 is 80% of the way from 0.8 to 0.95: crossed at 80% of each last interval
    t, name, times = st.fastest(curves, 0.92, "accuracy")
    assert name == "long" and times == pytest.approx([2.6, 3.0, 2.2]) and t == pytest.approx(2.6)
    # two of three short seeds reach 0.9: their half-time beats every long seed
    assert st.fastest(curves, 0.9, "accuracy") == (1.1, "short", [1.0, None, 1.1])
    assert st.fastest(curves, 0.99, "accuracy") == (None, None, [])
    assert st.best_config(curves, "accuracy") == "long"


def test_speedups_treat_never_as_no_speedup():
    assert st.ratio(4.0, 2.0) == 2.0 and st.ratio(None, 2.0) is None
    assert st.ratio(4.0, None) is None
    assert st.min_speedup([1.5, None, 2.0]) == 0.0
    assert st.min_speedup([1.5, 1.2]) == 1.2


def test_an_arm_is_compared_with_its_uniform_control_where_both_reach_a_target():
    rows = [{"a_time_s": 10.0, "b_time_s": None}, {"a_time_s": None, "b_time_s": 7.0},
            {"a_time_s": 4.0, "b_time_s": 6.0}, {"a_time_s": 2.0, "b_time_s": 6.0}]
    v = st.versus(rows, "a", "b")
    assert v["speedups"] == [None, None, 1.5, 3.0] and v["median"] == 2.25
    assert (v["only_arm"], v["only_control"]) == (1, 1)
    assert st.versus(rows[:2], "a", "b")["median"] is None


def test_budgets_are_passes_over_the_data_whatever_an_arm_plans_per_epoch():
    import dataclasses

    from hardbatch.trainer.distributed import JobConfig

    from benchmarks.frontier import Scale, arm_jobs, schedule

    base = dataclasses.replace(JobConfig(), plan_fraction=1.0, cost_model=False)
    arms = arm_jobs(base)
    plan = schedule(arms, Scale(100, 8, 10, (2, 4), (4,), 4), [0], ["fp32"])
    got = {(p["arm"], p["passes"]): p["epochs"] for p in plan}
    # epochs = passes for plans over all the data; over half of it, twice the epochs
    assert got[("plain", 2)] == 2 and got[("plain", 4)] == 4
    assert got[("hardbatch", 4)] == 4 and got[("uniform", 4)] == 4
    assert got[("cost_model", 4)] == 4
    assert got[("half", 4)] == 8 and got[("half_weighted", 4)] == 8
    assert got[("half_uniform", 4)] == 8 and got[("half_uncertain", 4)] == 8
    # plans that keep an epoch's steps on smaller batches get plain's epochs (its steps)
    assert got[("steps40", 4)] == 4 and got[("steps40_uniform", 4)] == 4
    assert arms["steps40"].scored_batch_size == 102 and arms["plain"].scored_batch_size == 256
    # the default's adaptive plans are packed: fewer, full batches, budgets still in passes
    assert arms["hardbatch"].plan_config().size_factor == 4.0
    assert arms["hardbatch"].plan_config().packed and not arms["unpacked"].plan_config().packed
    assert got[("fixed_size", 4)] == 4 and arms["fixed_size"].plan_config().size_factor == 0.0
    # plain trains every example of every pass, whatever the default plans per epoch
    half_default = arm_jobs(dataclasses.replace(base, plan_fraction=0.5))
    assert half_default["plain"].plan_fraction == 1.0 and not half_default["plain"].filter
    assert all(p["config"].endswith(f"/{p['epochs']}ep/lr{p['lr']:g}") for p in plan)
    # three learning rates for plain and hardbatch, the default's alone for an ablation
    assert {p["lr"] for p in plan if p["arm"] in ("plain", "hardbatch")} == {0.005, 0.01, 0.02}
    assert {p["lr"] for p in plan if p["arm"] == "uniform"} == {0.01}
    # two workers: plain DDP also at one process's global batch
    two = schedule(arms, Scale(100, 8, 10, (2,), (2,), 4), [0], ["fp32"], workers=2)
    assert {p.get("batch_size") for p in two if p["arm"] == "plain"} == {None, 5}
    # an ablation equal to the default shares its runs
    same = arm_jobs(dataclasses.replace(base, plan_fraction=0.5, beta=0.0, size_factor=0.0))
    assert not any(p["arm"] == "half" for p in schedule(same, Scale(100, 8, 10, (2,), (4,), 4),
                                                          [0], ["fp32"]))


def test_seed_resamples_are_every_draw_with_replacement_or_a_seeded_sample():
    assert len(st.seed_resamples(3)) == 27 and len(set(st.seed_resamples(3))) == 27
    assert (0, 1, 2) in st.seed_resamples(3) and (2, 2, 2) in st.seed_resamples(3)
    drawn = st.seed_resamples(6, limit=100)
    assert len(drawn) == 100 and drawn == st.seed_resamples(6, limit=100)
    assert all(len(d) == 6 and max(d) < 6 for d in drawn)


def test_percentiles_are_nearest_rank_so_never_and_infinite_survive():
    assert st.percentiles([float(x) for x in range(1, 11)]) == {"p10": 1.0, "p90": 9.0}
    assert st.percentiles([0.0] * 2 + [2.0] * 7 + [math.inf]) == {"p10": 0.0, "p90": 2.0}
    assert st.percentiles([1.0] + [math.inf] * 9)["p90"] == math.inf


def _runs(times: dict[str, list[float]]) -> list[dict]:
    """One run per (arm, seed): the arm reaches 0.99 at times[arm][seed]; plain's 1-budget
    config is its only one."""
    return [{"arm": arm, "config": f"{arm}/fp32/1ep", "seed": seed,
             "evals": curve((t / 2, 0.9), (t, 0.99))}
            for arm, ts in times.items() for seed, t in enumerate(ts)]


def test_seed_spread_redoes_the_analysis_on_each_resample_of_the_seeds():
    from benchmarks.frontier import seed_spread

    # plain's median over a resample of [10, 20, 30] is 10 in 7 of 27, 30 in 7, else 20:
    # hardbatch's 10 s everywhere gives 1x, 2x or 3x, and 1x and 3x at the 10th and 90th.
    runs = _runs({"plain": [10.0, 20.0, 30.0], "hardbatch": [10.0, 10.0, 10.0],
                  "uniform": [20.0, 20.0, 40.0]})
    spread = seed_spread(runs, "accuracy", ["plain", "hardbatch", "uniform"], set())
    assert spread["resamples"] == 27
    assert spread["speedup_at_best"] == {"p10": 1.0, "p90": 3.0}
    assert spread["speedup_vs_uniform_at_best"] == {"p10": 2.0, "p90": 4.0}
    # an ablation that is the default shares its runs: 1x against itself on every resample
    same = seed_spread(runs[:6], "accuracy", ["plain", "hardbatch", "uniform"], {"uniform"})
    assert same["speedup_vs_uniform_at_best"] == {"p10": 1.0, "p90": 1.0}


def test_seed_spread_counts_never_as_zero_and_a_control_that_never_gets_there_as_infinite():
    from benchmarks.frontier import seed_spread

    runs = _runs({"plain": [10.0, 10.0, 10.0], "hardbatch": [5.0, 5.0, 5.0],
                  "uniform": [5.0, 5.0, 5.0]})
    for r in runs:
        if r["arm"] == "uniform" and r["seed"] > 0:
            r["evals"] = curve((5.0, 0.9))  # two seeds of uniform never reach 0.99
        if r["arm"] == "hardbatch" and r["seed"] == 0:
            r["evals"] = curve((5.0, 0.9))  # hardbatch's seed 0 never does
    spread = seed_spread(runs, "accuracy", ["plain", "hardbatch", "uniform"], set())
    # resamples with two or three draws of seed 0 (7 of 27): hardbatch never, speedup 0
    assert spread["speedup_at_best"] == {"p10": 0.0, "p90": 2.0}
    assert spread["min_speedup_within_1pt"]["p10"] == 0.0
    assert spread["speedup_vs_uniform_at_best"]["p90"] is None  # infinite: JSON has no inf
