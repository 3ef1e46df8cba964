"""The driver's own sampler service: a child process, gone with the driver."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import httpx
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


def test_an_adaptive_plan_size_keeps_the_steps_and_scores_only_what_the_plan_trains(
        redis_url, monkeypatch):
    from hardbatch.trainer.distributed import JobConfig
    from hardbatch.trainer.driver import Driver
    from hardbatch.trainer.train import Runtime, fit

    # The service follows the table every refresh_s (2 s): these epochs take a fraction of that.
    monkeypatch.setenv("HARDBATCH_REFRESH_S", "0.05")
    # size_factor 0.5: at most half of the 90%-of-the-loss share, below half a round whatever
    # the losses; round 0 (nothing scored yet) trains everything.
    job = JobConfig(num_samples=2000, width=8, batch_size=100, epochs=4, size_factor=0.5,
                    beta=0.0, anneal_frac=0.0, workers=1, threads=1, progress=False,
                    redis=redis_url)
    with Driver(2000, job.epochs, run="adaptive", redis=redis_url, ray_address=None,
                plan=job.plan_config(), worker=job.worker_config()) as driver:
        assert driver.worker_config["importance_weights"]  # the skip marks travel as weights

        def settle(state):
            # Each epoch's losses applied and in the priorities (refresh_s 0.05) before the
            # next epoch asks for the one after: on a loaded machine this takes a while.
            driver.top(1)
            time.sleep(0.5)

        result = fit(job.train_config(), runtime=Runtime(hardbatch=driver.worker_config,
                                                         on_epoch_end=settle))
        driver.top(1)
        records = driver.info()["records"]
    assert [e["step"] for e in result.evals] == [20, 40, 60, 80]  # every epoch's steps
    scored = [e["scored_perc"] for e in result.epochs]
    # Round 1 is asked for at 90% of round 0, before the service saw its losses; round 2 on
    # sees round 0's (every sample's) losses.
    assert scored[0] == 1.0 and all(0.05 <= s < 0.5 for s in scored[2:]), scored
    assert records == round(2000 * sum(scored))  # what was scored, nothing skipped
