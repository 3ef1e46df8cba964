"""The frontier's arithmetic, on hand-made curves."""

from __future__ import annotations

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


def test_time_to_finds_the_first_eval_at_or_past_the_target_for_either_metric():
    c = curve((1.0, 0.5), (2.0, 0.8), (3.0, 0.7), (4.0, 0.9))
    assert st.time_to(c, 0.8, "accuracy") == 2.0
    assert st.time_to(c, 0.95, "accuracy") is None
    assert st.time_to(c, 0.15, "val_loss") == 4.0  # loss 0.1 at 4 s; 0.2 at 2 s is above


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
    assert st.fastest(curves, 0.92, "accuracy") == (3.0, "long", [3.0, 3.5, 2.5])
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
    # the default's adaptive plans keep full batches' slots and an epoch's steps
    assert arms["hardbatch"].plan_config().size_factor == 4.0
    assert got[("fixed_size", 4)] == 4 and arms["fixed_size"].plan_config().size_factor == 0.0
    # plain trains every example of every pass, whatever the default plans per epoch
    half_default = arm_jobs(dataclasses.replace(base, plan_fraction=0.5))
    assert half_default["plain"].plan_fraction == 1.0 and not half_default["plain"].filter
    assert all(p["config"].endswith(f"/{p['epochs']}ep") for p in plan)
    # an ablation equal to the default shares its runs
    same = arm_jobs(dataclasses.replace(base, plan_fraction=0.5, beta=0.0, size_factor=0.0))
    assert not any(p["arm"] == "half" for p in schedule(same, Scale(100, 8, 10, (2,), (4,), 4),
                                                          [0], ["fp32"]))
