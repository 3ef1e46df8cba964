"""Exactly once across restarts from checkpoints: records of a superseded attempt are dropped,
and a table that already applied some is rebuilt (docs/store.md, "Attempts"). Real Redis."""

from __future__ import annotations

import numpy as np
import pytest
import redis
from hardbatch.sampler.hardness import FIELDS
from hardbatch.sampler.records import pack
from hardbatch.services.materializer import Materializer
from hardbatch.services.store import LossStore, StoreError

N, STEPS, RANKS = 600, 3, 2  # per epoch: 3 steps per rank, 100 samples a step


@pytest.fixture
def store(redis_client: redis.Redis) -> LossStore:
    return LossStore(redis_client)


def batch(epoch: int, rank: int, k: int) -> bytes:
    """Rank `rank`'s records of the k-th step of `epoch`: the same bytes in every attempt."""
    step = epoch * STEPS + k + 1
    rng = np.random.default_rng(epoch * 100 + rank * 10 + k)
    ids = rng.permutation(N)[:100]
    return pack(ids, rng.random(100, dtype=np.float32), rng.random(100) < 0.7, step, epoch,
                rank).tobytes()


class Trainer:
    """Sends what two ranks of a training attempt report, in a fixed interleaving."""

    def __init__(self, store: LossStore, run: str) -> None:
        self.store, self.run, self.seq = store, run, [0] * RANKS

    def send(self, epoch: int, rank: int, k: int, attempt: int) -> None:
        self.seq[rank] += 1
        self.store.ingest(self.run, rank, self.seq[rank], batch(epoch, rank, k), attempt=attempt)

    def epoch(self, epoch: int, attempt: int, steps: int = STEPS) -> None:
        for k in range(steps):
            for rank in range(RANKS):
                self.send(epoch, rank, k, attempt)

    def checkpoint(self, epoch: int, attempt: int) -> None:
        self.store.checkpointed(self.run, attempt, (epoch + 1) * STEPS)


def tables_equal(a: Materializer, b: Materializer) -> None:
    with a.view() as ta, b.view() as tb:
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(ta, f), getattr(tb, f), err_msg=f)
        assert ta.applied == tb.applied


def fault_free(store: LossStore, epochs: int) -> Materializer:
    store.register_run("clean", N)
    t = Trainer(store, "clean")
    for e in range(epochs):
        t.epoch(e, 0)
        t.checkpoint(e, 0)
    m = Materializer(store, "clean", snapshot_interval_s=None)
    m.catch_up(10)
    return m


def test_a_resumed_attempt_supersedes_what_the_last_one_applied(store: LossStore) -> None:
    clean = fault_free(store, 4)
    store.register_run("faulty", N)
    t = Trainer(store, "faulty")
    m = Materializer(store, "faulty", snapshot_interval_s=None)
    t.epoch(0, 0)
    t.checkpoint(0, 0)
    t.epoch(1, 0)
    t.checkpoint(1, 0)
    t.epoch(2, 0, steps=2)  # killed two steps into epoch 2: its records were applied
    m.catch_up(10)
    assert m.snapshot()  # writes the state before epoch 2, not the live table
    assert store.run_info("faulty").snapshot_entries < store.run_info("faulty").entries
    assert store.resume("faulty", 1, 2 * STEPS)
    assert not store.resume("faulty", 1, 2 * STEPS)  # idempotent: every rank may say it
    with pytest.raises(StoreError, match="already resumed"):
        store.resume("faulty", 1, STEPS)
    t.send(2, 1, 2, attempt=0)  # a straggler of the superseded attempt: dropped
    t.epoch(2, 1)
    t.checkpoint(2, 1)
    t.epoch(3, 1)
    t.checkpoint(3, 1)
    m.catch_up(10)
    assert m.reloads == 1
    tables_equal(m, clean)
    superseded = 2 * RANKS * 100 + 100
    assert m.stats().consumed_records - m.stats().applied_records == superseded
    # A consumer that starts now (snapshot + log replay) agrees, and so does one after a
    # snapshot of the final state.
    fresh = Materializer(store, "faulty", snapshot_interval_s=None)
    fresh.catch_up(10)
    tables_equal(fresh, clean)
    assert fresh.snapshot()
    assert store.run_info("faulty").snapshot_entries == store.run_info("faulty").entries
    tables_equal(Materializer(store, "faulty"), clean)


def test_a_consumer_that_learns_of_the_resume_late_drops_the_same_records(
        store: LossStore) -> None:
    clean = fault_free(store, 3)
    store.register_run("late", N)
    t = Trainer(store, "late")
    t.epoch(0, 0)
    t.checkpoint(0, 0)
    t.epoch(1, 0, steps=1)
    store.resume("late", 1, STEPS)
    t.epoch(1, 1)
    t.checkpoint(1, 1)
    t.epoch(2, 1)
    t.checkpoint(2, 1)
    m = Materializer(store, "late", snapshot_interval_s=None)  # never applied the old ones
    m.catch_up(10)
    assert m.reloads == 0
    tables_equal(m, clean)


def test_two_restarts_in_a_row_and_snapshots_between(store: LossStore) -> None:
    clean = fault_free(store, 4)
    store.register_run("twice", N)
    t = Trainer(store, "twice")
    m = Materializer(store, "twice", snapshot_interval_s=None)
    t.epoch(0, 0)
    t.checkpoint(0, 0)
    t.epoch(1, 0, steps=2)
    m.catch_up(10)
    m.snapshot()
    store.resume("twice", 1, STEPS)
    t.epoch(1, 1)
    t.checkpoint(1, 1)
    m.catch_up(10)
    m.snapshot()
    t.epoch(2, 1, steps=1)
    m.catch_up(10)
    store.resume("twice", 2, 2 * STEPS)
    t.epoch(2, 2)
    t.checkpoint(2, 2)
    t.epoch(3, 2)
    t.checkpoint(3, 2)
    m.catch_up(10)
    assert m.reloads == 2
    tables_equal(m, clean)


def test_untagged_runs_snapshot_as_before(store: LossStore) -> None:
    store.register_run("plain", N)
    store.ingest("plain", 0, 1, batch(0, 0, 0))
    m = Materializer(store, "plain", snapshot_interval_s=None)
    m.catch_up(10)
    assert m.snapshot()
    assert store.run_info("plain").snapshot_entries == 1
