"""Plan composition: disjointness, determinism, strata and their inclusion probabilities,
unbiased weights, suspects, annealing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hardbatch.sampler.plans import (
    SKIP,
    PlanConfig,
    PrioritySnapshot,
    compose_round,
    mass_share,
    validate_round_shape,
)


def _snapshot(h, seen=None, suspect=None, **cfg):
    h = np.asarray(h, dtype=np.float32)
    seen = np.ones(len(h), dtype=np.int32) if seen is None else np.asarray(seen)
    return PrioritySnapshot.build(h, seen, PlanConfig(**cfg), suspect=suspect)


def test_round_is_disjoint_and_covers_every_rank_equally():
    rng = np.random.default_rng(0)
    snap = _snapshot(rng.exponential(size=5000), alpha=2.0, lam=0.05)
    plan = compose_round(snap, seed=7, round_=3, world_size=4, batches=5, batch_size=64)
    assert plan.ids.shape == plan.weights.shape == (4, 5, 64)
    flat = plan.ids.ravel()
    assert len(np.unique(flat)) == flat.size
    assert flat.min() >= 0 and flat.max() < 5000
    parts = [plan.for_rank(r)[0] for r in range(4)]
    assert all(p.shape == (5, 64) for p in parts)


def test_full_round_takes_every_id_once():
    snap = _snapshot(np.linspace(0, 3, 600), alpha=3.0, lam=0.0)
    plan = compose_round(snap, seed=1, round_=0, world_size=3, batches=4, batch_size=50)
    assert np.array_equal(np.sort(plan.ids.ravel()), np.arange(600))
    # Every inclusion probability is 1 = M / N: all weights 1.
    assert np.allclose(plan.weights, 1.0)


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
    unseen = np.arange(0, n, 10)  # 100 unseen, zero hardness would never win
    seen[unseen] = 0
    h = np.full(n, 5.0)
    h[unseen] = 0.0
    snap = _snapshot(h, seen, alpha=4.0, lam=0.0)
    plan = compose_round(snap, seed=0, round_=0, world_size=2, batches=2, batch_size=40)
    assert set(unseen) <= set(plan.ids.ravel().tolist())
    # More unseen than a round needs: the round is made of unseen ids only, weights 1.
    small = compose_round(snap, seed=0, round_=1, world_size=2, batches=1, batch_size=20)
    assert set(small.ids.ravel().tolist()) <= set(unseen.tolist())
    assert np.all(small.weights == 1.0)


def test_alpha_zero_is_one_uniform_stratum_with_weights_one():
    rng = np.random.default_rng(2)
    snap = _snapshot(rng.exponential(size=500) * 100, alpha=0.0, lam=0.0, beta=1.0)
    assert list(snap.sizes[snap.sizes > 0]) == [500]
    plan = compose_round(snap, seed=0, round_=0, world_size=2, batches=3, batch_size=50)
    assert np.allclose(plan.weights, 1.0)


def test_strata_follow_priority_and_allocation_caps_at_one():
    h = np.concatenate([np.full(900, 0.01), np.full(100, 5.0)])
    snap = _snapshot(h, alpha=1.0, lam=0.1, strata=4)
    easy, hard = snap.stratum(0), snap.stratum(3)
    assert set(easy.tolist()) == set(range(900)) and set(hard.tolist()) == set(range(900, 1000))
    counts = snap.allocate(300)
    assert counts.sum() == 300
    assert counts[3] == pytest.approx(100)  # the hard stratum is capped at all of its members
    assert counts[0] == pytest.approx(200)
    assert snap.allocate(5000).sum() == pytest.approx(1000) and np.all(snap.allocate(0) == 0)


def test_uncertain_priority_ranks_confidently_wrong_as_low_as_learned():
    # Cross-entropy losses: learned (p = 0.99), uncertain (p = 0.5), confidently wrong (0.01).
    h = np.repeat(-np.log([0.99, 0.5, 0.01]).astype(np.float32), 300)
    wrong, middle = set(range(600, 900)), set(range(300, 600))

    def share(snap, ids):
        counts = snap.allocate(300)
        of = {s: set(snap.stratum(s).tolist()) for s in range(8)}
        return sum(counts[s] for s in range(8) if of[s] and of[s] <= ids) / 300

    by_loss = _snapshot(h, alpha=1.0, lam=0.0, eps=1e-9, strata=8)
    unc = _snapshot(h, alpha=1.0, lam=0.0, eps=1e-9, strata=8, priority="uncertain")
    # Loss priority: shares follow the loss, the wrong ones take most of the round.
    assert share(by_loss, wrong) == pytest.approx(4.605 / (0.01005 + 0.6931 + 4.605), rel=1e-3)
    # Uncertain: p (1 - p) is 0.25 in the middle and 0.0099 at both ends.
    assert share(unc, middle) == pytest.approx(0.25 / (0.25 + 2 * 0.0099), rel=1e-3)
    learned = set(range(300))
    assert share(unc, wrong | learned) == pytest.approx(2 * 0.0099 / (0.25 + 2 * 0.0099), rel=1e-3)
    assert any(set(unc.stratum(s).tolist()) == wrong | learned for s in range(8))


def test_allocation_is_proportional_to_the_target_below_the_cap():
    h = np.concatenate([np.full(500, 1.0), np.full(500, 2.0)])
    snap = _snapshot(h, alpha=1.0, lam=0.0, eps=1e-9, strata=2)
    # q of the hard half is twice the easy half's: 100 slots split 1:2.
    assert np.allclose(snap.allocate(99), [33, 66])


def test_inclusion_frequencies_and_unbiased_weights():
    """Over many rounds: each id's frequency matches its stratum's m_s / n_s, and the weighted
    sum of a fixed per-sample value is, on average, (M / N) times its full-data sum.

    Tolerances: every id within 4.5 binomial standard deviations (fixed seeds, so the test is
    deterministic; with a correct sampler a miss has probability ~7e-6 per id); the mean of the
    weighted sums within 4.5 standard errors of the mean.
    """
    rng = np.random.default_rng(3)
    n, m = 60, 12
    h = rng.exponential(size=n).astype(np.float32)
    snap = _snapshot(h, alpha=1.0, lam=0.2, beta=1.0, strata=5)
    counts = snap.allocate(m)
    assert counts.min() < 1 < counts.max()  # some strata expect less than one id a round
    expected = np.zeros(n)
    for s, k in enumerate(counts):
        members = snap.stratum(s)
        if len(members):
            expected[members] = k / len(members)
    rounds = 20_000
    freq = np.zeros(n)
    g = rng.normal(size=n) + 2.0  # a stand-in for per-sample gradients
    sums = np.empty(rounds)
    for r in range(rounds):
        plan = compose_round(snap, seed=11, round_=r, world_size=1, batches=m, batch_size=1)
        ids, w = plan.ids.ravel(), plan.weights.ravel()
        freq[ids] += 1
        sums[r] = float((w * g[ids]).sum())
    freq /= rounds
    sigma = np.sqrt(expected * (1 - expected) / rounds)
    assert np.all(np.abs(freq - expected) <= 4.5 * sigma + 1e-12), (freq, expected)
    target = m / n * g.sum()
    assert abs(sums.mean() - target) <= 4.5 * sums.std() / np.sqrt(rounds)


@pytest.mark.parametrize("seed", range(5))
def test_random_rounding_keeps_the_total_and_the_expectations(seed):
    from hardbatch.sampler.plans import _round_counts

    rng = np.random.default_rng(seed)
    expected = rng.random(7) * 3
    expected[-1] += np.ceil(expected.sum()) - expected.sum()  # an integer total
    draws = np.array([_round_counts(expected, rng) for _ in range(20_000)])
    assert np.all(draws.sum(axis=1) == round(expected.sum()))
    assert np.all((draws == np.floor(expected)) | (draws == np.ceil(expected)))
    frac = expected - np.floor(expected)
    sigma = np.sqrt(frac * (1 - frac) / 20_000)
    assert np.all(np.abs(draws.mean(axis=0) - expected) <= 4.5 * sigma + 1e-9)


def test_beta_zero_gives_weights_one_and_beta_scales_them():
    h = np.concatenate([np.full(80, 0.1), np.full(20, 4.0)])
    flat = compose_round(_snapshot(h, alpha=1.0, beta=0.0), seed=0, round_=0, world_size=1,
                         batches=1, batch_size=30)
    assert np.all(flat.weights == 1.0)
    full = compose_round(_snapshot(h, alpha=1.0, beta=1.0), seed=0, round_=0, world_size=1,
                         batches=1, batch_size=30)
    half = compose_round(_snapshot(h, alpha=1.0, beta=0.5), seed=0, round_=0, world_size=1,
                         batches=1, batch_size=30)
    assert np.array_equal(full.ids, half.ids)
    assert np.allclose(half.weights, np.sqrt(full.weights), rtol=1e-6)
    hard = full.ids.ravel() >= 80
    # Hard samples are over-sampled, so they weigh less than easy ones.
    assert full.weights.ravel()[hard].max() < full.weights.ravel()[~hard].min()


def test_suspects_get_weight_zero_and_only_the_floor_rate():
    n = 2000
    h = np.full(n, 1.0, dtype=np.float32)
    suspect = np.zeros(n, dtype=bool)
    suspect[:200] = True
    h[:200] = 9.0  # the hardest, yet never favoured
    snap = _snapshot(h, suspect=suspect, alpha=1.0, lam=0.1)
    assert np.array_equal(snap.suspects, np.arange(200))
    taken = 0
    for r in range(20):
        plan = compose_round(snap, seed=0, round_=r, world_size=2, batches=5, batch_size=50)
        ids, w = plan.ids.ravel(), plan.weights.ravel()
        is_sus = ids < 200
        assert np.all(w[is_sus] == 0.0) and np.all(w[~is_sus] > 0.0)
        taken += int(is_sus.sum())
    # Floor rate lam * M / N = 0.1 * 500 / 2000 -> 5 of the 200 suspects per round.
    assert taken == 20 * 5
    # Unseen samples cannot be suspects.
    unseen_sus = _snapshot(h, seen=np.zeros(n), suspect=suspect)
    assert len(unseen_sus.suspects) == 0


def test_round_larger_than_the_non_suspects_takes_suspects_to_fill():
    h = np.ones(100, dtype=np.float32)
    suspect = np.arange(100) < 30
    snap = _snapshot(h, suspect=suspect, lam=0.0)
    plan = compose_round(snap, seed=0, round_=0, world_size=1, batches=9, batch_size=10)
    ids, w = plan.ids.ravel(), plan.weights.ravel()
    assert len(np.unique(ids)) == 90 and np.sum(ids < 30) == 20 and np.all(w[ids < 30] == 0)


def test_annealed_rounds_are_uniform_but_suspects_stay_zero():
    h = np.zeros(40)
    h[:4] = 100.0  # four very hard samples
    suspect = np.zeros(40, dtype=bool)
    suspect[39] = True
    cfg = {"alpha": 4.0, "lam": 0.0, "beta": 1.0, "anneal_frac": 0.25, "total_rounds": 8}
    snap = _snapshot(h, suspect=suspect, **cfg)
    assert [snap.config.is_uniform_round(r) for r in range(8)] == [False] * 6 + [True] * 2
    hard = compose_round(snap, seed=0, round_=5, world_size=1, batches=1, batch_size=4)
    assert set(hard.ids.ravel().tolist()) == {0, 1, 2, 3} and not hard.uniform
    counts = np.zeros(40)
    for r in range(6, 4006):
        plan = compose_round(snap, seed=0, round_=r, world_size=1, batches=1, batch_size=4)
        ids, w = plan.ids.ravel(), plan.weights.ravel()
        assert plan.uniform and np.all(w[ids != 39] == 1.0) and np.all(w[ids == 39] == 0.0)
        counts[ids] += 1
    # Uniform inclusion probability 4/40 = 0.1; 4000 rounds -> sigma ~ 0.0047.
    assert np.all(np.abs(counts / 4000 - 0.1) < 4.5 * np.sqrt(0.1 * 0.9 / 4000))


def test_concentrated_priorities_finish():
    h = np.full(10_000, 1e-6)
    h[17] = 1e6
    snap = _snapshot(h, alpha=2.0, lam=0.0)
    plan = compose_round(snap, seed=0, round_=0, world_size=2, batches=4, batch_size=100)
    flat = plan.ids.ravel()
    assert 17 in flat and len(np.unique(flat)) == 800
    assert np.all(np.isfinite(plan.weights)) and np.all(plan.weights > 0)


def test_bad_hardness_values_get_a_policy():
    h = np.array([np.nan, -1.0, np.inf, 2.0, 1.0, 0.0])
    snap = _snapshot(h, alpha=1.0, lam=0.0, strata=4)
    top, bottom = snap.stratum(3).tolist(), snap.stratum(0).tolist()
    assert {0, 2, 3} <= set(top)  # non-finite counts as the hardest
    assert {1, 5} <= set(bottom)  # negative counts as zero


@pytest.mark.parametrize(
    "cfg",
    [
        {"alpha": -1.0}, {"alpha": float("nan")}, {"lam": 1.5}, {"lam": -0.1}, {"eps": 0.0},
        {"beta": 2.0}, {"anneal_frac": 0.5}, {"anneal_frac": 1.5, "total_rounds": 4},
        {"total_rounds": 0}, {"hardness": "loss"}, {"strata": 0}, {"strata": 257},
        {"suspect_scorings": 0}, {"suspect_factor": -1.0}, {"suspect_factor": float("inf")},
        {"suspect_floor": float("inf")}, {"priority": "hard"}, {"size_factor": -1.0},
        {"size_factor": float("nan")}, {"size_mass": 0.0}, {"size_mass": 1.5}, {"size_min": 0.0},
    ],
)
def test_bad_config_raises(cfg):
    with pytest.raises(ValueError):
        PlanConfig(**cfg)


def test_suspect_factor_zero_turns_the_guard_off():
    assert PlanConfig(suspect_factor=0.0).suspect_rule() is None
    rule = PlanConfig(suspect_scorings=3, suspect_factor=5.0, suspect_floor=0.5).suspect_rule()
    assert rule is not None and (rule.min_scorings, rule.factor, rule.floor) == (3, 5.0, 0.5)


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
    with pytest.raises(ValueError, match="suspect"):
        PrioritySnapshot.build(np.zeros(3), np.zeros(3), PlanConfig(), suspect=np.zeros(4))


@pytest.mark.parametrize("seed", range(4))
def test_mass_share_matches_the_sorted_count(seed):
    rng = np.random.default_rng(seed)
    v = rng.exponential(size=20_000) ** (1 + seed)
    v[:100] = 0.0  # zeros carry nothing but count in the share's denominator
    desc = np.sort(v)[::-1]
    for mass in (0.5, 0.9, 0.99):
        exact = (np.searchsorted(np.cumsum(desc), mass * v.sum()) + 1) / len(v)
        assert mass_share(v, mass) == pytest.approx(exact, abs=0.01)


def test_mass_share_of_spread_and_degenerate_inputs():
    assert mass_share(np.ones(10), 0.9) == pytest.approx(0.9)
    assert mass_share(np.zeros(5), 0.9) == 1.0
    assert mass_share(np.zeros(0), 0.9) == 1.0
    assert mass_share(np.array([100.0] + [1e-3] * 999), 0.9) == pytest.approx(0.001)


def _adaptive(seed=0, n=20_000, **cfg):
    # Most samples learned (loss ~0.01), a tenth still hard (loss ~2).
    rng = np.random.default_rng(seed)
    h = np.where(rng.random(n) < 0.1, rng.uniform(1.0, 3.0, n), rng.uniform(0.0, 0.02, n))
    return h, _snapshot(h, **{"size_factor": 4.0, "beta": 0.0, **cfg})


def test_adaptive_size_trains_a_multiple_of_the_concentrated_share_spread_over_batches():
    h, snap = _adaptive(packed=False)
    desc = np.sort(h)[::-1]
    share = (np.searchsorted(np.cumsum(desc), 0.9 * h.sum()) + 1) / len(h)
    assert snap.concentration == pytest.approx(share, abs=0.005) and share < 0.1
    plan = compose_round(snap, seed=3, round_=2, world_size=2, batches=10, batch_size=1000)
    flat = plan.ids.ravel()
    assert len(np.unique(flat)) == flat.size == 20_000  # distinct, every rank disjoint
    trained = plan.weights >= 0
    assert trained.sum() == snap.trained(20_000, 20) == np.ceil(4 * snap.concentration * 20_000)
    per_batch = trained.sum(axis=2)
    assert per_batch.max() - per_batch.min() <= 1  # every step trains the same count +- 1
    assert np.all(plan.weights[~trained] == SKIP)
    # Hard-biased: nearly all hard samples are in, the learned ones fill the uniform floor.
    hard = h > 0.5
    assert hard[plan.ids[trained]].mean() > 0.25 > hard.mean()
    assert hard[plan.ids[trained]].sum() > 0.9 * hard.sum()
    again = compose_round(snap, seed=3, round_=2, world_size=2, batches=10, batch_size=1000)
    assert np.array_equal(again.ids, plan.ids) and np.array_equal(again.weights, plan.weights)


def test_packed_round_trains_the_chosen_share_in_fewer_full_batches():
    h, snap = _adaptive()
    plan = compose_round(snap, seed=3, round_=2, world_size=2, batches=10, batch_size=1000)
    per_rank = math.ceil(snap.trained(20_000, 20) / 2)
    assert plan.asked == 10 and plan.batches == math.ceil(per_rank / 1000) < 10
    flat = plan.ids.ravel()
    assert len(np.unique(flat)) == flat.size  # distinct, every rank disjoint
    trained = plan.weights >= 0
    per_batch = trained.sum(axis=2)
    # Every rank trains as many; all batches full but the last, which is never empty.
    assert (trained.sum(axis=(1, 2)) == per_rank).all()
    assert (per_batch[:, :-1] == 1000).all() and (per_batch[:, -1] >= 1).all()
    assert np.all(plan.weights[~trained] == SKIP)
    hard = h > 0.5
    assert hard[plan.ids[trained]].sum() > 0.9 * hard.sum()  # still hard-biased
    again = compose_round(snap, seed=3, round_=2, world_size=2, batches=10, batch_size=1000)
    assert np.array_equal(again.ids, plan.ids) and np.array_equal(again.weights, plan.weights)


@pytest.mark.parametrize("world,batch_size", [(1, 7), (3, 10), (4, 33), (5, 1)])
def test_packed_round_last_batch_is_never_empty(world, batch_size):
    rng = np.random.default_rng(world)
    for trial in range(20):
        n = int(rng.integers(world * batch_size * 2, 3000))
        h = np.where(rng.random(n) < rng.uniform(0.01, 0.3), 2.0, 1e-3)
        snap = _snapshot(h, size_factor=float(rng.uniform(0.5, 4.0)), size_min=0.01)
        batches = n // (world * batch_size)
        plan = compose_round(snap, seed=trial, round_=1, world_size=world, batches=batches,
                             batch_size=batch_size)
        trained = (plan.weights >= 0).sum(axis=2)
        assert plan.batches <= batches and (trained[:, -1] >= 1).all()
        assert (trained[:, :-1] == batch_size).all()
        assert len(np.unique(plan.ids)) == plan.ids.size


def test_a_full_packed_round_is_the_asked_shape():
    rng = np.random.default_rng(1)
    spread = _snapshot(rng.uniform(1.0, 2.0, 5000), size_factor=4.0)
    plan = compose_round(spread, seed=0, round_=1, world_size=2, batches=4, batch_size=500)
    assert plan.ids.shape == (2, 4, 500) and plan.asked == 4 and (plan.weights >= 0).all()


def test_adaptive_size_is_the_whole_round_while_losses_are_spread_or_unseen():
    rng = np.random.default_rng(1)
    spread = _snapshot(rng.uniform(1.0, 2.0, 5000), size_factor=4.0)
    assert spread.concentration > 0.25 and spread.trained(4000, 8) == 4000
    unseen = _snapshot(np.zeros(5000), seen=np.zeros(5000), size_factor=4.0)
    assert unseen.concentration == 1.0
    plan = compose_round(unseen, seed=0, round_=0, world_size=1, batches=8, batch_size=500)
    assert np.all(plan.weights >= 0)


def test_adaptive_size_floor_uniform_control_and_annealing():
    h, snap = _adaptive(size_factor=1.0, size_min=0.3)
    assert snap.trained(20_000, 20) == 6000  # 1 x ~0.07 is below the floor of 0.3
    assert snap.trained(40, 20) == 20  # at least one per batch
    _, off = _adaptive(size_factor=0.0)
    assert off.concentration == 1.0 and off.trained(20_000, 20) == 20_000
    _, uni = _adaptive(alpha=0.0)  # the same size, uniform over the scored samples
    plan = compose_round(uni, seed=0, round_=1, world_size=1, batches=10, batch_size=2000)
    trained = plan.weights >= 0
    assert trained.sum() == snap.trained(20_000, 20) * 0 + uni.trained(20_000, 10)
    assert (h[plan.ids[trained]] > 0.5).mean() == pytest.approx(0.1, abs=0.03)
    _, ann = _adaptive(anneal_frac=0.5, total_rounds=4)
    plan = compose_round(ann, seed=0, round_=3, world_size=1, batches=10, batch_size=2000)
    assert plan.uniform and np.all(plan.weights == 1.0)


def test_adaptive_size_measures_last_losses_not_the_average():
    # An average over past scorings stays spread (every sample was hard once) while the last
    # losses have concentrated on a few: the size follows the last losses.
    n = 10_000
    ema = np.full(n, 1.0, dtype=np.float32)
    last = np.full(n, 1e-3, dtype=np.float32)
    last[:500] = 2.0
    snap = PrioritySnapshot.build(ema, np.ones(n), PlanConfig(size_factor=4.0), last_loss=last)
    # 90% of the total (1000 + 9.5) is 455 of the 500 hard samples
    assert snap.concentration == pytest.approx(0.0455, abs=0.001)
    assert snap.trained(n, 10) == pytest.approx(0.182 * n, abs=40)
    spread = PrioritySnapshot.build(ema, np.ones(n), PlanConfig(size_factor=4.0))
    assert spread.trained(n, 10) == n


def test_mass_share_reads_bad_values_as_the_snapshot_does():
    # NaN/inf: the largest finite value; negative: 0.
    assert mass_share(np.array([np.nan, 1.0, -5.0, 1.0]), 0.6) == pytest.approx(0.5)
    assert mass_share(np.array([np.inf, -1.0]), 0.9) == 1.0  # nothing finite above 0
