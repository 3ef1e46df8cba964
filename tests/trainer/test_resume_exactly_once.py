"""A run that resumes from a checkpoint applies each trained step's records once: the table
equals the fault-free run's, bit for bit (in one process, real Redis; the Ray version is
tests/trainer/test_distributed.py::test_a_killed_worker_resumes_from_the_last_checkpoint)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from hardbatch.sampler.hardness import FIELDS
from hardbatch.services.materializer import Materializer
from hardbatch.services.store import LossStore
from hardbatch.trainer.reporter import LossReporter
from hardbatch.trainer.train import Runtime, TrainConfig, fit

CONFIG = TrainConfig(num_samples=1200, epochs=3, batch_size=100, width=16, progress=False,
                     threads=1)


class Died(Exception):
    pass


def train(redis_url: str, run: str, resume: dict[str, Any] | None = None,
          die_at_checkpoint: int = 0) -> list[dict[str, Any]]:
    """Trains CONFIG (from `resume`, if given) streaming to `run`; returns the checkpoints.
    With `die_at_checkpoint` k, the k-th checkpoint fails: the worker dies there."""
    states: list[dict[str, Any]] = []

    def checkpoint(state: dict[str, Any]) -> None:
        if len(states) + 1 == die_at_checkpoint:
            raise Died
        states.append(copy.deepcopy(state))

    reporter = LossReporter(redis_url, run, 0, num_samples=CONFIG.num_samples)
    try:
        fit(CONFIG, reporter=reporter, runtime=Runtime(on_epoch_end=checkpoint, resume=resume))
    except Died:
        pass
    finally:
        assert reporter.close(30).ok
    return states


def table(store: LossStore, run: str) -> Materializer:
    m = Materializer(store, run, snapshot_interval_s=None)
    m.catch_up(30)
    return m


def test_resuming_from_a_checkpoint_applies_each_step_once(redis_client, redis_url):
    store = LossStore(redis_client)
    train(redis_url, "clean")
    clean = table(store, "clean")
    # Attempt 0 trains all three epochs and streams them, then dies while it checkpoints;
    # attempt 1 resumes from the checkpoint after epoch 2 and trains epoch 3 again.
    states = train(redis_url, "faulty", die_at_checkpoint=3)
    assert len(states) == 2
    m = table(store, "faulty")
    assert m.stats().applied_records == 3 * CONFIG.num_samples
    assert m.snapshot()  # a snapshot taken before the resume: it holds epoch 1 only
    assert store.run_info("faulty").snapshot_entries > 0
    train(redis_url, "faulty", resume=states[1])
    m.catch_up(30)
    assert m.reloads == 1
    info = store.run_info("faulty")
    assert info.records == 4 * CONFIG.num_samples
    for got in (m, table(store, "faulty")):
        stats = got.stats()
        assert stats.applied_records == 3 * CONFIG.num_samples
        assert stats.consumed_records - stats.applied_records == CONFIG.num_samples
        with got.view() as a, clean.view() as b:
            for f in FIELDS:
                np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert store.fences("faulty") == {0: 0, 1: 24}


def test_a_restart_before_the_first_checkpoint_supersedes_the_whole_first_attempt(
        redis_client, redis_url):
    store = LossStore(redis_client)
    train(redis_url, "clean")
    clean = table(store, "clean")
    train(redis_url, "early", die_at_checkpoint=1)  # dies in its first checkpoint
    train(redis_url, "early")  # Ray starts the group again from scratch
    m = table(store, "early")
    assert store.fences("early") == {0: 0, 1: 0}
    assert m.stats().consumed_records - m.stats().applied_records == CONFIG.num_samples
    with m.view() as a, clean.view() as b:
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
