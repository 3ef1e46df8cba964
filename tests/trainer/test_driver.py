"""The driver's own sampler service: a child process, gone with the driver."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import httpx
import numpy as np
import psutil
import pytest
from hardbatch.trainer.driver import local_service


def _services(parent: psutil.Process) -> list[psutil.Process]:
    return [p for p in parent.children(recursive=True)
            if "hardbatch.cli" in p.cmdline() and "serve" in p.cmdline()]


def test_the_local_service_runs_in_a_child_process_and_stops_with_the_context(redis_url):
    with local_service(redis_url) as url:
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        (child,) = _services(psutil.Process())  # a child, not a thread: no GIL shared
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=2)


def test_the_local_service_dies_with_a_killed_driver(redis_url):
    driver = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from hardbatch.trainer.driver import local_service
        with local_service({redis_url!r}) as url:
            print(url, flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    url = driver.stdout.readline().strip()  # type: ignore[union-attr]
    assert httpx.get(f"{url}/healthz").status_code == 200
    (child,) = _services(psutil.Process(driver.pid))
    driver.kill()
    driver.wait()
    psutil.wait_procs([child], timeout=20)
    assert not child.is_running()


@pytest.mark.parametrize("keep_steps", [False, True])
def test_plans_over_part_of_the_data_drop_batches_or_keep_steps(redis_url, keep_steps):
    from hardbatch.trainer.distributed import JobConfig
    from hardbatch.trainer.driver import Driver
    from hardbatch.trainer.train import Runtime, fit

    job = JobConfig(num_samples=2000, width=8, batch_size=100, epochs=2, plan_fraction=0.4,
                    keep_steps=keep_steps, beta=0.0, workers=1, threads=1, progress=False,
                    redis=redis_url)
    with Driver(2000, job.epochs, run=f"keep-{keep_steps}", redis=redis_url, ray_address=None,
                plan=job.plan_config(), worker=job.worker_config()) as driver:
        result = fit(job.train_config(), runtime=Runtime(hardbatch=driver.worker_config))
        driver.top(1)  # waits until the service has applied every record
        records = driver.info()["records"]
    # 40% of the data a round either way: 20 steps of 40 samples (a full epoch's steps) or 8
    # steps of 100
    steps = 20 if keep_steps else 8
    assert [e["step"] for e in result.evals] == [steps, 2 * steps]
    assert records == 2 * 800


@pytest.mark.parametrize("packed", [True, False])
def test_an_adaptive_plan_size_trains_only_what_the_plan_chose(redis_url, packed):
    from hardbatch.trainer.distributed import JobConfig
    from hardbatch.trainer.driver import Driver
    from hardbatch.trainer.train import Runtime, fit

    # size_factor 0.5: at most half of the 90%-of-the-loss share, below half a round whatever
    # the losses; round 0 (nothing scored yet) trains everything.
    job = JobConfig(num_samples=2000, width=8, batch_size=100, epochs=4, size_factor=0.5,
                    beta=0.0, anneal_frac=0.0, workers=1, threads=1, progress=False,
                    redis=redis_url, packed=packed)
    with Driver(2000, job.epochs, run=f"adaptive-{packed}", redis=redis_url, ray_address=None,
                plan=job.plan_config(), worker=job.worker_config()) as driver:
        assert driver.worker_config["importance_weights"]  # the skip marks travel as weights
        # No waiting between epochs: each round is composed from all of the last one's losses.
        result = fit(job.train_config(), runtime=Runtime(hardbatch=driver.worker_config))
        driver.top(1)
        records = driver.info()["records"]
    steps = [e["step"] for e in result.evals]
    scored = [e["scored_perc"] for e in result.epochs]
    assert steps[0] == 20 and scored[0] == 1.0  # round 0: nothing scored yet, all of it
    if packed:  # fewer steps, each a full batch but the round's last
        per_epoch = np.diff(steps)
        assert all(2 <= s <= 10 for s in per_epoch), steps
        assert all(s > 0.5 for s in scored[1:]), scored
        trained = 2000 + sum(round(s * 100 * n) for s, n in zip(scored[1:], per_epoch,
                                                                strict=True))
    else:  # every epoch's steps, each scoring only what the plan trains
        assert steps == [20, 40, 60, 80]
        assert all(0.05 <= s < 0.5 for s in scored[1:]), scored
        trained = round(2000 * sum(scored))
    assert records == trained  # what was scored, nothing skipped


def test_runs_of_one_seed_on_the_service_plans_are_the_same_run(redis_url):
    from hardbatch.trainer.distributed import JobConfig
    from hardbatch.trainer.driver import Driver
    from hardbatch.trainer.train import Runtime, fit

    def train(run, seed):
        # score_precision=auto picks by timing: pinned, as a run that must repeat would.
        job = JobConfig(num_samples=2000, width=8, batch_size=100, epochs=3, size_factor=1.0,
                        seed=seed, workers=1, threads=1, progress=False, redis=redis_url,
                        score_precision="fp32", step_curve=False)
        with Driver(2000, job.epochs, run=run, redis=redis_url, service=url, ray_address=None,
                    plan=job.plan_config(), worker=job.worker_config()) as driver:
            result = fit(job.train_config(), runtime=Runtime(hardbatch=driver.worker_config))
            with driver.client() as client:
                plans = [client.plan(run, rank=0, world_size=1, round=r, batches=20,
                                     batch_size=100, with_weights=True) for r in range(3)]
        return result, plans

    with local_service(redis_url) as url:  # one service for the three runs
        (a, plans_a), (b, plans_b) = train("seed-3-a", 3), train("seed-3-b", 3)
        _, plans_c = train("seed-4", 4)
    assert [e["val_loss"] for e in a.evals] == [e["val_loss"] for e in b.evals]
    assert [e["scored_perc"] for e in a.epochs] == [e["scored_perc"] for e in b.epochs]
    assert a.epochs[-2]["scored_perc"] < 1.0  # the plans did leave samples out
    for x, y in zip(plans_a, plans_b, strict=True):
        assert (x.ids == y.ids).all() and (x.weights == y.weights).all()
    assert not (plans_c[1].ids == plans_a[1].ids).all()
