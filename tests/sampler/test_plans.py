"""Plan composition: disjointness, determinism, the target distribution, weights, annealing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hardbatch.sampler.plans import (
    PlanConfig,
    PrioritySnapshot,
    compose_round,
    validate_round_shape,
)


def _snapshot(h, seen=None, **cfg):
    h = np.asarray(h, dtype=np.float32)
    seen = np.ones(len(h), dtype=np.int32) if seen is None else np.asarray(seen)
    return PrioritySnapshot.build(h, seen, PlanConfig(**cfg))


def _exact_inclusion(q: np.ndarray, k: int) -> np.ndarray:
    """P(i among k successive draws without replacement), by enumerating ordered draws."""
    q = q / q.sum()
    incl = np.zeros(len(q))
    for seq in itertools.permutations(range(len(q)), k):
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= q[i] / left
            left -= q[i]
        incl[list(seq)] += prob
    return incl


def test_round_is_disjoint_and_covers_every_rank_equally():
    rng = np.random.default_rng(0)
    snap = _snapshot(rng.exponential(size=5000), alpha=2.0, lam=0.05)
    plan = compose_round(snap, seed=7, round_=3, world_size=4, batches=5, batch_size=64)
    assert plan.ids.shape == (4, 5, 64)
    flat = plan.ids.ravel()
    assert len(np.unique(flat)) == flat.size
    assert flat.min() >= 0 and flat.max() < 5000
    parts = [plan.for_rank(r)[0] for r in range(4)]
    assert all(p.shape == (5, 64) for p in parts)
    assert len(np.unique(np.concatenate([p.ravel() for p in parts]))) == 4 * 5 * 64


def test_full_round_takes_every_id_once():
    snap = _snapshot(np.linspace(0, 3, 600), alpha=3.0, lam=0.0)
    plan = compose_round(snap, seed=1, round_=0, world_size=3, batches=4, batch_size=50)
    assert np.array_equal(np.sort(plan.ids.ravel()), np.arange(600))


def test_deterministic_from_seed_round_and_world_size():
    rng = np.random.default_rng(1)
    h = rng.exponential(size=20_000)
    a = compose_round(_snapshot(h, beta=0.5), seed=5, round_=9, world_size=2, batches=3,
                      batch_size=32)
    b = compose_round(_snapshot(h.copy(), beta=0.5), seed=5, round_=9, world_size=2, batches=3,
                      batch_size=32)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.weights, b.weights)
    for kwargs in ({"seed": 6, "round_": 9, "world_size": 2}, {"seed": 5, "round_": 10,
                   "world_size": 2}, {"seed": 5, "round_": 9, "world_size": 3}):
        c = compose_round(_snapshot(h), batches=3, batch_size=32, **kwargs)
        assert not np.array_equal(a.ids[0], c.ids[0])


def test_never_scored_samples_come_first():
    n = 1000
    seen = np.ones(n, dtype=np.int32)
    unseen = np.arange(0, n, 10)  # 100 unseen, low ids, zero hardness would never win
    seen[unseen] = 0
    h = np.full(n, 5.0)
    h[unseen] = 0.0
    snap = _snapshot(h, seen, alpha=4.0, lam=0.0)
    plan = compose_round(snap, seed=0, round_=0, world_size=2, batches=2, batch_size=40)
    assert set(unseen) <= set(plan.ids.ravel().tolist())
    # More unseen than a round needs: the round is made of unseen ids only.
    small = compose_round(snap, seed=0, round_=1, world_size=2, batches=1, batch_size=20)
    assert set(small.ids.ravel().tolist()) <= set(unseen.tolist())


def test_alpha_zero_gives_uniform_target():
    rng = np.random.default_rng(2)
    snap = _snapshot(rng.exponential(size=50) * 100, alpha=0.0, lam=0.0, beta=1.0)
    ids = np.arange(50)
    assert np.allclose(snap.target_probability(ids), 1 / 50)
    assert np.allclose(snap.weights(ids), 1.0)


@pytest.mark.parametrize(
    ("h", "cfg"),
    [
        ([0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 0.0, 8.0], {"alpha": 1.0, "lam": 0.1}),
        ([0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 0.0, 8.0], {"alpha": 2.0, "lam": 0.3}),
        ([3.0, 0.2, 0.5, 1.0, 2.0, 4.0, 0.0, 8.0], {"alpha": 0.0, "lam": 0.0}),
    ],
)
def test_selection_frequencies_match_successive_sampling(h, cfg):
    """Over many rounds each id's selection frequency matches its exact inclusion probability.

    Tolerance: every id within 4.5 binomial standard deviations of its exact inclusion
    probability, and the chi-square-like total within a wide bound. Seeds are fixed, so the test
    is deterministic; with a correct sampler the chance of a 4.5-sigma miss is about 7e-6 per id.
    """
    snap = _snapshot(h, **cfg)
    k = 3  # world 1 x 3 batches x 1
    rounds = 20_000
    counts = np.zeros(len(h))
    for r in range(rounds):
        plan = compose_round(snap, seed=123, round_=r, world_size=1, batches=3, batch_size=1)
        counts[plan.ids.ravel()] += 1
    expected = _exact_inclusion(snap.target_probability(np.arange(len(h))), k)
    assert np.isclose(expected.sum(), k)
    freq = counts / rounds
    sigma = np.sqrt(expected * (1 - expected) / rounds)
    assert np.all(np.abs(freq - expected) <= 4.5 * sigma + 1e-12), (freq, expected)


def test_target_mixes_priority_and_uniform_floor():
    h = np.array([0.0, 1.0, 3.0])
    snap = _snapshot(h, alpha=1.0, lam=0.25, eps=1e-3)
    p = h + 1e-3
    q = 0.75 * p / p.sum() + 0.25 / 3
    assert np.allclose(snap.target_probability(np.arange(3)), q)


def test_importance_weights_invert_the_bias():
    h = np.array([0.5, 1.0, 2.0, 4.0])
    snap = _snapshot(h, alpha=1.0, lam=0.0, beta=1.0)
    w = snap.weights(np.arange(4))
    q = snap.target_probability(np.arange(4))
    assert w.max() == pytest.approx(1.0)
    assert np.allclose(w * q, (w * q)[0], rtol=1e-5)  # w proportional to 1/q when beta = 1
    half = _snapshot(h, alpha=1.0, lam=0.0, beta=0.5).weights(np.arange(4))
    assert np.allclose(half, np.sqrt(w), rtol=1e-5)
    plan = compose_round(snap, seed=0, round_=0, world_size=1, batches=1, batch_size=4)
    assert np.allclose(plan.weights.ravel(), snap.weights(plan.ids.ravel()))


def test_weights_are_one_without_beta():
    snap = _snapshot(np.arange(100.0), alpha=2.0)
    plan = compose_round(snap, seed=0, round_=0, world_size=2, batches=2, batch_size=10)
    assert np.all(plan.weights == 1.0)


def test_annealed_rounds_are_uniform():
    h = np.zeros(40)
    h[:4] = 100.0  # four very hard samples
    cfg = {"alpha": 4.0, "lam": 0.0, "beta": 1.0, "anneal_frac": 0.25, "total_rounds": 8}
    snap = _snapshot(h, **cfg)
    assert [snap.config.is_uniform_round(r) for r in range(8)] == [False] * 6 + [True] * 2
    hard = compose_round(snap, seed=0, round_=5, world_size=1, batches=1, batch_size=4)
    assert set(hard.ids.ravel().tolist()) == {0, 1, 2, 3} and not hard.uniform
    counts = np.zeros(40)
    for r in range(6, 4006):
        plan = compose_round(snap, seed=0, round_=r, world_size=1, batches=1, batch_size=4)
        assert plan.uniform and np.all(plan.weights == 1.0)
        counts[plan.ids.ravel()] += 1
    # Uniform inclusion probability 4/40 = 0.1; 4000 rounds -> sigma ~ 0.0047.
    assert np.all(np.abs(counts / 4000 - 0.1) < 4.5 * np.sqrt(0.1 * 0.9 / 4000))


def test_concentrated_priorities_stay_exact_and_finish():
    # One sample holds almost all the mass and lam = 0: the rejection loop must fall back.
    h = np.full(10_000, 1e-6)
    h[17] = 1e6
    snap = _snapshot(h, alpha=2.0, lam=0.0)
    plan = compose_round(snap, seed=0, round_=0, world_size=2, batches=4, batch_size=100)
    flat = plan.ids.ravel()
    assert 17 in flat and len(np.unique(flat)) == 800


def test_bad_hardness_values_get_a_policy():
    h = np.array([np.nan, -1.0, np.inf, 2.0, 1.0])
    snap = _snapshot(h, alpha=1.0, lam=0.0)
    q = snap.target_probability(np.arange(5))
    assert np.all(np.isfinite(q)) and q.sum() == pytest.approx(1.0)
    assert q[0] == q[2] == q.max()  # non-finite counts as the hardest
    assert q[1] == q.min()  # negative counts as zero


@pytest.mark.parametrize(
    "cfg",
    [
        {"alpha": -1.0}, {"alpha": float("nan")}, {"lam": 1.5}, {"lam": -0.1}, {"eps": 0.0},
        {"beta": 2.0}, {"anneal_frac": 0.5}, {"anneal_frac": 1.5, "total_rounds": 4},
        {"total_rounds": 0}, {"hardness": "loss"},
    ],
)
def test_bad_config_raises(cfg):
    with pytest.raises(ValueError):
        PlanConfig(**cfg)


def test_bad_round_raises():
    snap = _snapshot(np.ones(100))
    with pytest.raises(ValueError, match="needs 120 distinct ids"):
        compose_round(snap, seed=0, round_=0, world_size=2, batches=3, batch_size=20)
    with pytest.raises(ValueError, match="round"):
        compose_round(snap, seed=0, round_=-1, world_size=1, batches=1, batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        validate_round_shape(100, 1, 1, 0)
    plan = compose_round(snap, seed=0, round_=0, world_size=2, batches=1, batch_size=1)
    with pytest.raises(ValueError, match="rank"):
        plan.for_rank(2)
    with pytest.raises(ValueError, match="empty"):
        PrioritySnapshot.build(np.zeros(0), np.zeros(0), PlanConfig())
    with pytest.raises(ValueError, match="one length"):
        PrioritySnapshot.build(np.zeros(3), np.zeros(4), PlanConfig())


@pytest.mark.parametrize("n", [1, 7, 128, 129, 1000, 40_001])
def test_block_search_equals_a_plain_binary_search(n):
    from hardbatch.sampler.plans import _search

    rng = np.random.default_rng(n)
    h = rng.exponential(size=n)
    h[rng.random(n) < 0.3] = 0.0  # stretches of zero-priority samples
    seen = (rng.random(n) < 0.9).astype(np.int32)
    seen[0] = 1
    snap = _snapshot(h, seen, alpha=2.0, eps=1e-9)
    u = np.sort(rng.random(5000)) * snap.cdf[-1]
    expected = np.searchsorted(snap.cdf, u, side="right")
    assert np.array_equal(_search(snap, u), expected)
