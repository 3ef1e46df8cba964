"""Distributed runs on a real Ray local cluster, with the real service and Redis."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from hardbatch.trainer.distributed import JobConfig
from hardbatch.trainer.driver import ray_init, train_worker_pids
from hardbatch.trainer.launch import JobResult, launch
from hardbatch.trainer.plan_source import batches_per_round

pytestmark = pytest.mark.slow

SMALL = dict(workers=2, num_samples=4000, width=16, batch_size=128, progress=False)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray_init("")
    yield
    ray.shutdown()


def test_two_workers_train_on_service_plans_and_stream_every_loss(ray_cluster, redis_url,
                                                                  tmp_path):
    # progress=True: the driver follows the run through the service while it trains. The
    # filter on every step (no gate): this small model's kept share stays high for 3 epochs.
    job = JobConfig(**{**SMALL, "progress": True}, epochs=3, plan_fraction=0.5,
                    filter_gate=False, redis=redis_url, run="dist-plans",
                    storage=str(tmp_path))
    done = launch(job)
    assert [e["epoch"] for e in done.result.epochs] == [1, 2, 3]
    # 2 ranks x 7 batches x 128 ids per round (half the data), 3 rounds, all in the store
    assert done.info["records"] == 3 * 2 * 7 * 128
    assert done.info["lag_records"] == 0 and done.info["rejected_records"] == 0
    assert len(done.hardest) == 10
    assert done.hardest[0]["ema"] >= done.hardest[-1]["ema"]
    assert 0 < done.result.epochs[-1]["samp_perc"] < 1


def test_two_runs_of_one_seed_on_two_workers_are_the_same_run(ray_cluster, redis_url,
                                                            tmp_path):
    # The default configuration (service plans with an adaptive size, the noise guard, the
    # filter gate) under two run names; fp32 scoring, as auto picks its precision by timing.
    # size_factor 1: the plans leave samples out from the second round on.
    runs = [launch(JobConfig(**SMALL, epochs=4, seed=5, size_factor=1.0,
                             score_precision="fp32", step_curve=False, redis=redis_url,
                             run=f"twin-{k}",
                             storage=str(tmp_path / str(k)))).result for k in range(2)]
    a, b = ([(e["val_loss"], e["samp_perc"], e["scored_perc"]) for e in r.epochs] for r in runs)
    assert a == b
    assert min(e["scored_perc"] for e in runs[0].epochs) < 1.0


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_cluster, redis_url, tmp_path):
    job = JobConfig(**{**SMALL, "num_samples": 8000, "width": 48}, epochs=6, redis=redis_url,
                    run="dist-kill", storage=str(tmp_path), max_failures=2)
    box: dict[str, object] = {}
    runner = threading.Thread(target=lambda: box.update(done=launch(job)), daemon=True)
    runner.start()
    deadline = time.monotonic() + 240
    ckpts: list[Path] = []
    # The second checkpoint's folder means every rank finished reporting the first one.
    while time.monotonic() < deadline and len(ckpts) < 2:
        ckpts = list(tmp_path.glob("dist-kill/checkpoint_*"))
        time.sleep(0.05)
    assert len(ckpts) >= 2, "no checkpoint appeared"
    pids = train_worker_pids()
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGKILL)
    runner.join(300)
    assert not runner.is_alive()
    done = box["done"]
    assert isinstance(done, JobResult)
    assert [e["epoch"] for e in done.result.epochs] == [1, 2, 3, 4, 5, 6]
    assert done.result.config.get("resumed_at_epochs"), "the run restarted from scratch"
    # Exactly once: the table holds each record of the steps that were trained, once; the
    # superseded attempt's records past its last checkpoint are in the log but not applied.
    # Each epoch's records: the slots its plan trained (an adaptive size trains fewer), the same
    # in a replayed epoch (the service keeps its round).
    slots = 2 * 128 * batches_per_round(8000, 2, 128, job.plan_fraction)
    trained = sum(round(e["scored_perc"] * slots) for e in done.result.epochs)
    info = done.info
    assert info["applied_records"] == trained, info
    assert info["lag_records"] == 0 and info["rejected_records"] == 0, info
    assert info["records"] >= trained, info


def test_bad_jobs_are_refused_before_anything_starts(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="already has checkpoints"):
        launch(JobConfig(**SMALL, epochs=1, run="taken", storage=str(tmp_path)))
    with pytest.raises(ValueError, match="cannot give"):
        launch(JobConfig(**{**SMALL, "batch_size": 4000}, epochs=1, storage=str(tmp_path)))


def test_the_noise_guard_is_on_by_default_and_can_be_turned_off():
    on, off = JobConfig().plan_config(), JobConfig(guard=False).plan_config()
    assert on.suspect_rule() is not None and off.suspect_rule() is None
    assert off == dataclasses.replace(on, suspect_factor=0.0)


def test_an_adaptive_plan_size_reaches_the_service_with_the_filters_mass():
    plan = JobConfig(size_factor=4.0, min_loss_perc=0.8).plan_config()
    assert (plan.size_factor, plan.size_mass) == (4.0, 0.8)
    assert JobConfig(size_factor=0.0).plan_config().size_factor == 0.0
