"""The runtime cost model, driven by synthetic timings."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hardbatch.sampler.cost_model import FIT_BELOW, CostModel, CostModelConfig, Mode

FULL_S = 1.0  # a full step
SCORE_S = 0.3  # the scoring forward
OVERHEAD = 0.1  # share of a training step that does not shrink with fewer samples


def train_s(kept: float) -> float:
    return FULL_S * (OVERHEAD + (1 - OVERHEAD) * kept)


def drive(cm: CostModel, kept_at, steps: range) -> list[Mode]:
    """Runs `steps` with kept fraction `kept_at(step)`; returns the mode of each step."""
    modes = []
    for step in steps:
        mode = cm.decide(step)
        s = kept_at(step)
        if mode is Mode.FILTER:
            cm.observe(step, mode, score_s=SCORE_S, train_s=train_s(s), kept_frac=s)
        else:
            cm.observe(step, mode, score_s=0.0, train_s=FULL_S, kept_frac=s)
        modes.append(mode)
    return modes


def config(**kw) -> CostModelConfig:
    base = {"warmup_steps": 3, "probe_every": 50, "probe_steps": 2, "margin": 0.05,
            "smoothing": 0.5}
    return CostModelConfig(**{**base, **kw})


def test_warmup_measures_full_then_filter() -> None:
    cm = CostModel(config())
    modes = drive(cm, lambda s: 0.5, range(6))
    assert modes == [Mode.FULL] * 3 + [Mode.FILTER] * 3


def test_filter_turns_off_while_it_keeps_most_and_back_on_when_it_pays() -> None:
    # Early training keeps 90% (a filtered step costs 0.3 + 0.91 > 1); later it keeps 20%
    # (0.3 + 0.28 < 0.95). The full steps report what the filter would have kept.
    cm = CostModel(config())
    modes = drive(cm, lambda s: 0.9 if s < 30 else 0.2, range(60))
    assert modes[6:30].count(Mode.FULL) == 24
    assert all(m is Mode.FILTER for m in modes[33:])
    assert [d["mode"] for d in cm.decisions] == ["full", "filter"]
    off, on = cm.decisions
    assert off["step"] == 6 and off["predicted_ratio"] > 1.0
    assert 30 <= on["step"] <= 33 and on["predicted_ratio"] < 0.95
    assert cm.summary()["mode"] == "filter" and cm.summary()["switches"] == 2


@pytest.mark.parametrize("horizon", [0, 50])
def test_a_falling_kept_fraction_keeps_the_filter_on(horizon) -> None:
    # The losses concentrate: the filter keeps 95% at first, 1 point less every step. At
    # step 6 it keeps ~90% (a filtered step costs ~1.1 of a full one): judged by that alone it
    # turns off; projected 50 steps ahead (~40% kept) it pays and stays on.
    cm = CostModel(config(trend_window=5, horizon_steps=horizon))
    modes = drive(cm, lambda s: max(0.95 - 0.01 * s, 0.05), range(40))
    if horizon:
        assert cm.decisions == [] and all(m is Mode.FILTER for m in modes[3:])
        assert cm.projected_kept() < cm.summary()["kept_frac"] - 0.3
    else:
        assert cm.decisions[0]["mode"] == "full" and cm.decisions[0]["step"] == 6


def test_a_rising_kept_fraction_is_judged_as_it_is() -> None:
    cm = CostModel(config(trend_window=5, horizon_steps=50))
    drive(cm, lambda s: min(0.2 + 0.01 * s, 0.9), range(20))
    assert cm.summary()["kept_slope"] > 0
    assert cm.projected_kept() == cm.summary()["kept_frac"]


def test_the_prediction_matches_the_cost_formula() -> None:
    cm = CostModel(config(smoothing=0.0))
    drive(cm, lambda s: 0.4, range(6))
    assert cm.predicted_ratio() == pytest.approx(SCORE_S + OVERHEAD + (1 - OVERHEAD) * 0.4)
    assert cm.mode is Mode.FILTER  # the model starts in filter mode and 0.76 < 0.95 keeps it
    assert cm.summary()["overhead"] == pytest.approx(OVERHEAD)


def test_hysteresis_keeps_the_mode_between_the_thresholds() -> None:
    # Predicted ratio 0.97: not cheap enough to turn on (< 0.95), not dear enough to turn off.
    # (Keeping more than FIT_BELOW, o is not fitted and counts as 0.) No trend projection:
    # the step from 0.9 down to `kept` would read as a falling kept fraction.
    kept = 0.97 - SCORE_S
    assert kept > FIT_BELOW
    on = CostModel(config(horizon_steps=0))
    drive(on, lambda s: kept, range(40))
    assert on.mode is Mode.FILTER and on.decisions == []
    off = CostModel(config(horizon_steps=0))
    drive(off, lambda s: 0.9, range(10))  # turned off
    drive(off, lambda s: kept, range(10, 40))
    assert off.mode is Mode.FULL and len(off.decisions) == 1


def test_probes_run_the_other_mode_periodically() -> None:
    cm = CostModel(config())
    modes = drive(cm, lambda s: 0.9, range(200))
    # Switched off at step 6; then FILTER probes of 2 steps at the end of every 50 steps.
    probes = [i for i, m in enumerate(modes[7:], start=7) if m is Mode.FILTER]
    assert probes == [54, 55, 104, 105, 154, 155]
    assert cm.summary()["filter_steps"] == 3 + 6


def test_same_measurements_same_decisions_and_checkpoint_resume() -> None:
    def kept(step: int) -> float:
        return 0.95 - 0.004 * step if step < 200 else 0.1

    a, b = CostModel(config()), CostModel(config())
    assert drive(a, kept, range(150)) == drive(b, kept, range(150))
    state = copy.deepcopy(a.state_dict())
    c = CostModel(config())
    c.load_state_dict(state)
    assert drive(a, kept, range(150, 300)) == drive(c, kept, range(150, 300))
    assert a.decisions == c.decisions and a.summary() == c.summary()


def test_without_would_be_kept_fractions_a_probe_turns_it_back_on() -> None:
    cm = CostModel(config())
    for step in range(300):
        mode = cm.decide(step)
        s = 0.9 if step < 20 else 0.1
        if mode is Mode.FILTER:
            cm.observe(step, mode, score_s=SCORE_S, train_s=train_s(s), kept_frac=s)
        else:  # the worker does not compute what the filter would keep
            cm.observe(step, mode, score_s=0.0, train_s=FULL_S, kept_frac=None)
    assert [d["mode"] for d in cm.decisions] == ["full", "filter"]
    assert cm.decisions[1]["step"] == 55  # during the first probe (steps 54, 55)


@pytest.mark.parametrize("kw", [{"score_s": -1.0}, {"train_s": float("nan")},
                                {"kept_frac": 1.5}, {"kept_frac": -0.1}])
def test_bad_measurements_raise(kw) -> None:
    args = {"score_s": 0.1, "train_s": 0.2, "kept_frac": 0.5, **kw}
    with pytest.raises(ValueError):
        CostModel().observe(0, Mode.FILTER, **args)


@pytest.mark.parametrize("kw", [{"margin": 1.0}, {"margin": -0.1}, {"warmup_steps": 0},
                                {"probe_steps": 0}, {"probe_every": 4, "probe_steps": 4},
                                {"smoothing": 1.0}, {"trend_window": 0},
                                {"horizon_steps": -1}])
def test_bad_config_raises(kw) -> None:
    with pytest.raises(ValueError):
        CostModelConfig(**kw)


def test_the_fixed_share_is_fitted_only_where_timing_noise_is_not_amplified() -> None:
    near_full = CostModel(config(smoothing=0.0))
    drive(near_full, lambda s: 0.8, range(8))
    assert near_full.summary()["overhead"] is None  # o = 0 (optimistic) until s < FIT_BELOW
    assert near_full.predicted_ratio() == pytest.approx(SCORE_S + 0.8)


def test_kept_gate_filters_where_the_kept_share_is_low_or_falling_towards_low():
    from hardbatch.sampler.cost_model import KeptGate

    gate = KeptGate()  # 8 stretches a round
    assert not gate.filters([]) and not gate.filters([0.9])  # nothing known, or high
    assert gate.filters([0.5]) and gate.filters([0.5, 0.6])  # low, even while it rises
    assert gate.filters([0.90, 0.87])  # 0.87 - 8 x 0.03 = 0.63 a round ahead
    # The sequence task's first epoch: falling 1.8 points a stretch at most, 0.70 ahead.
    assert not gate.filters([0.898, 0.894, 0.876, 0.845, 0.829])
    # A share that wobbles is not falling: the fall is over up to a round, not one stretch.
    wobble = [0.87, 0.89, 0.86, 0.88, 0.87, 0.89, 0.86, 0.88, 0.86]
    assert not any(gate.filters(wobble[:k]) for k in range(1, len(wobble) + 1))
    assert not gate.filters([0.80, 0.85])  # high and rising
    assert gate.projected([0.9, 0.3]) == 0.0
    for bad in ({"max_kept": 0.0}, {"max_kept": 1.5}, {"windows": 0}):
        with pytest.raises(ValueError):
            KeptGate(**bad)


def test_step_curve_fits_a_line_through_slow_outliers_and_says_where_shrinking_pays():
    from hardbatch.sampler.cost_model import StepCurve

    rng = np.random.default_rng(0)
    c = StepCurve()
    assert c.fit() is None and c.estimate() == [0.0] * 4
    for _ in range(30):
        c.add(256, 0.012 + 256 * 4e-5 + rng.normal(0, 2e-4))  # full steps: no slope yet
    assert c.fit() is None  # one sample count: the slope is unknown
    for n in rng.integers(40, 240, 150):
        c.add(int(n), 0.012 + n * 4e-5 + rng.normal(0, 2e-4), score_s=0.004)
    for n in (60, 200, 120):
        c.add(n, 0.3)  # a garbage collection, another process on the core
    a, b = c.fit()
    assert a == pytest.approx(0.012, abs=5e-4) and b == pytest.approx(4e-5, rel=0.05)
    v = StepCurve.verdict(c.estimate(), 256)
    assert v["shrink_pays_below"] == pytest.approx(1 - 0.004 / (b * 256))
    # two ranks' estimates add up to their mean; a rank that knows nothing does not count
    two = [x + y for x, y in zip(c.estimate(), StepCurve().estimate(), strict=True)]
    assert StepCurve.verdict(two, 256) == v
    # a step that costs the same at any size: shrinking never pays
    flat = StepCurve()
    for n in (32, 64, 128, 256):
        flat.add(n, 0.01, score_s=0.002)
    assert StepCurve.verdict(flat.estimate(), 256)["shrink_pays_below"] == 0.0
    assert StepCurve.verdict([0.0] * 4, 256)["shrink_pays_below"] is None
