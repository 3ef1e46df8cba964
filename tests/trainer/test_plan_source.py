"""Plans from a real service, the local fallback when it is away, and rejoining it."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
import torch
from hardbatch.services.client import SamplerClient, SamplerError
from hardbatch.services.store import LossStore
from hardbatch.trainer.driver import local_service
from hardbatch.trainer.plan_source import Round, RoundPlans, batches_per_round, shard_plan


def test_batches_per_round_is_equal_for_every_rank_and_at_least_one():
    assert batches_per_round(1000, 2, 100) == 5
    assert batches_per_round(1000, 3, 100) == 3
    assert batches_per_round(1000, 2, 100, fraction=0.5) == 2
    assert batches_per_round(10, 4, 100) == 1


def test_shard_plans_are_disjoint_full_batches():
    parts = [shard_plan(1000, 64, 7, r, 2, seed=3, epoch=1) for r in (0, 1)]
    ids = [torch.cat(p) for p in parts]
    assert all(len(p) == 7 and all(len(b) == 64 for b in p) for p in parts)
    assert not set(ids[0].tolist()) & set(ids[1].tolist())
    # more than the data per round: ids repeat rather than a rank running short
    big = shard_plan(100, 64, 2, 1, 2, seed=0, epoch=0)
    assert [len(b) for b in big] == [64, 64]


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


def test_falls_back_to_a_local_shuffle_and_rejoins_the_service(redis_url):
    run = "plans-fallback"
    store = LossStore.from_url(redis_url)
    store.register_run(run, 2000)
    port = _dead_port()
    # Refused connections fail at once; the timeout only bounds the first plan of a fresh
    # service, which takes over a second on a loaded 2-core machine.
    away = RoundPlans(SamplerClient(f"http://127.0.0.1:{port}", timeout_s=10), run,
                      rank=1, world_size=2, batch_size=100, fraction=1.0, seed=5)
    got = away(0, 2000)
    assert away.fallback_rounds == 1 and away.service_rounds == 0
    assert [b.tolist() for b in got] == [b.tolist() for b in shard_plan(2000, 100, 10, 1, 2, 5, 0)]

    with local_service(redis_url, port=port) as url:
        away(1, 2000)
        assert away.service_rounds == 1  # rejoined
        store.register_run("plans-half", 2000)
        plans = [RoundPlans(SamplerClient(url), "plans-half", rank=r, world_size=2, batch_size=100,
                            fraction=0.5, seed=5) for r in (0, 1)]
        rounds = [[p(epoch, 2000) for p in plans] for epoch in (0, 1)]
        for p in plans:
            assert p.service_rounds == 2 and p.fallback_rounds == 0
    for per_rank in rounds:
        a, b = (torch.cat(x) for x in per_rank)
        assert len(a) == len(b) == 500  # 5 batches of 100 each: half the data per round
        assert not set(a.tolist()) & set(b.tolist())  # no example to two workers in a round


def test_a_round_after_losses_waits_for_them_and_says_when_it_could_not(redis_url,
                                                                          monkeypatch):
    monkeypatch.setenv("HARDBATCH_ROUND_WAIT_S", "1.0")
    store = LossStore.from_url(redis_url)
    store.register_run("plans-wait", 2000)
    with local_service(redis_url) as url, SamplerClient(url) as client:
        waits = RoundPlans(client, "plans-wait", rank=0, world_size=1, batch_size=100,
                           fraction=1.0, seed=0, after_losses=True)
        assert len(waits(0, 2000)) == 20
        t0 = time.monotonic()
        assert len(waits(1, 2000)) == 20  # round 0's losses never come: composed after 1 s
        assert 1.0 <= time.monotonic() - t0 < 8.0
        metrics = httpx.get(f"{url}/metrics").text
        assert 'hardbatch_rounds_composed_early_total{run="plans-wait"} 1' in metrics
        # A round once composed is the round: asking again does not wait.
        t0 = time.monotonic()
        waits(1, 2000)
        assert time.monotonic() - t0 < 1.0


def test_a_4xx_is_a_mistake_that_raises_not_an_outage(redis_url):
    with local_service(redis_url) as url:
        plans = RoundPlans(SamplerClient(url), "no-such-run", rank=0, world_size=1,
                           batch_size=100, fraction=1.0, seed=0)
        with pytest.raises(SamplerError) as err:
            plans(0, 2000)
        assert err.value.status == 404 and plans.fallback_rounds == 0


def test_a_round_looks_up_weights_by_id_and_refuses_ids_it_did_not_plan():
    rnd = Round([torch.tensor([5, 2]), torch.tensor([9, 0])],
                [torch.tensor([0.5, 2.0]), torch.tensor([0.0, 1.5])])
    assert rnd.weights_of(torch.tensor([0, 5, 9])).tolist() == [1.5, 0.5, 0.0]
    for bad in ([1], [10], [-1], [2, 3]):
        with pytest.raises(ValueError, match="not in the current round"):
            rnd.weights_of(torch.tensor(bad))


def test_a_round_whose_weights_are_all_one_applies_none():
    rnd = Round([torch.tensor([3, 1])], [torch.ones(2)])
    assert rnd.weights is None and rnd.weights_of(torch.tensor([1])) is None


def test_a_round_yields_skipped_slots_as_minus_one_and_never_weighs_them():
    rnd = Round([torch.tensor([5, 2, 7]), torch.tensor([9, 0, 4])],
                [torch.tensor([1.0, -1.0, 0.0]), torch.tensor([-1.0, -1.0, 1.0])])
    assert [b.tolist() for b in rnd] == [[5, -1, 7], [-1, -1, 4]]
    assert rnd.weights_of(torch.tensor([4, 7])).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="not in the current round"):
        rnd.weights_of(torch.tensor([2]))
