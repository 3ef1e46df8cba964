"""A run at a real sampler service whose plans carry importance weights that differ per sample,
for checking the integrations' loss against the public worker API."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from hardbatch.trainer.reporter import LossReporter

from hardbatch import Driver, PlanConfig, WorkerConfig


class Recorder:
    """A reporter that keeps what it is sent."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def report(self, ids, losses, kept, step, epoch) -> None:
        self.calls.append((ids.copy(), losses.copy(), kept.copy(), step, epoch))


def weighted_run(redis_url: str, run: str, n: int, plan: PlanConfig | None = None,
                 worker: WorkerConfig | None = None) -> Iterator[Driver]:
    plan = plan or PlanConfig(alpha=2.0, lam=0.1, beta=1.0)
    # Half the data a round: inclusion probabilities, and so the weights, differ by hardness
    # (a round over every sample takes each with probability 1: all weights 1). The cost
    # model and the gate off: the integration and its reference worker filter alike on every
    # step.
    worker = worker or WorkerConfig(min_loss_perc=0.7, score_precision="fp32",
                                    plan_fraction=0.5, cost_model=False, filter_gate=False)
    with Driver(n, rounds=2, redis=redis_url, run=run, plan=plan, worker=worker,
                ray_address=None) as d:
        # Some history first, so priorities (and so the weights) differ per sample.
        rep = LossReporter(d.redis_url, d.run, rank=0)
        rep.report(np.arange(n), np.linspace(0.01, 3.0, n, dtype=np.float32),
                   np.ones(n, dtype=bool), 1, 0)
        assert rep.close(30).ok
        deadline = time.monotonic() + 10
        while d.info().get("lag_records", 1) > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert d.worker_config["importance_weights"]
        yield d


@pytest.fixture
def recorder_class() -> type[Recorder]:
    return Recorder


@pytest.fixture
def lightning_run(redis_url: str) -> Iterator[Driver]:
    yield from weighted_run(redis_url, f"lightning-{time.time_ns()}", 256)


@pytest.fixture
def transformers_run(redis_url: str) -> Iterator[Driver]:
    yield from weighted_run(redis_url, f"transformers-{time.time_ns()}", 256)


@pytest.fixture
def packed_run(redis_url: str) -> Iterator[Driver]:
    """Plans of an adaptive size, packed: with the history's losses spread from 0.01 to 3, a
    round trains about 40% of the 256 samples, as fewer, full batches."""
    plan = PlanConfig(alpha=1.0, beta=0.0, size_factor=0.5)
    worker = WorkerConfig(score_precision="fp32", filter=False)
    yield from weighted_run(redis_url, f"packed-{time.time_ns()}", 256, plan, worker)
