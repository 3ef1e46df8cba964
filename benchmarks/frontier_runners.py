"""How the frontier benchmark trains one config: in this process, or on Ray Train workers.

Both start what they share once for the whole benchmark (an embedded Redis and the sampler
service; Ray for workers > 1) and give every run its own name at the store. A hardbatch run is
the full system: registered with its plan config, plans from the service (`RoundPlans`),
losses streamed with `LossReporter`. A plain run is what a user runs without hardbatch: a
seeded shuffle, every example trained, nothing streamed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from pathlib import Path

from hardbatch.services.client import SamplerClient
from hardbatch.services.redis_server import redis_url_or_embedded
from hardbatch.services.store import LossStore
from hardbatch.trainer.distributed import JobConfig
from hardbatch.trainer.driver import local_service
from hardbatch.trainer.train import RunResult


class Runner(contextlib.ExitStack):
    """Redis and the sampler service for the whole benchmark; `train(job)` runs one config."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.redis_url = ""
        self.service = ""
        self._count = 0

    def __enter__(self) -> Runner:
        super().__enter__()
        self.redis_url = self.enter_context(redis_url_or_embedded(None, tcp=True))
        self.service = self.enter_context(local_service(self.redis_url))
        self.client = self.enter_context(SamplerClient(self.service))
        self.store = LossStore.from_url(self.redis_url)
        self.callback(self.store.client.close)
        return self

    def new_run(self, job: JobConfig) -> str:
        self._count += 1
        return f"frontier-{os.getpid()}-{self._count}-s{job.seed}"

    def train(self, job: JobConfig, num_samples: int) -> tuple[RunResult, str | None]:
        """Trains `job`; returns its result and its run name at the store (None for plain)."""
        raise NotImplementedError

    def settle(self, run: str, timeout_s: float = 30.0) -> None:
        """Waits until the service has applied every record of `run`."""
        deadline = time.monotonic() + timeout_s
        while (self.client.run_info(run).get("lag_records") or 0) > 0 \
                and time.monotonic() < deadline:
            time.sleep(0.2)


class LocalRunner(Runner):
    """One training process: the loop here, the service in a child process."""

    def train(self, job: JobConfig, num_samples: int) -> tuple[RunResult, str | None]:
        from hardbatch.trainer.driver import Driver
        from hardbatch.trainer.train import Runtime, fit

        if job.plans == "local":
            return fit(job.train_config()), None
        run = self.new_run(job)
        # The public driver, joining this benchmark's Redis and service (Ray left alone).
        with Driver(num_samples, job.epochs, run=run, redis=self.redis_url,
                    service=self.service, ray_address=None, plan=job.plan_config(),
                    worker=job.worker_config()) as driver:
            result = fit(job.train_config(), runtime=Runtime(hardbatch=driver.worker_config))
        return result, run


class RayRunner(Runner):
    """Ray Train workers via `launch`, on one Ray cluster started once for the benchmark."""

    def __enter__(self) -> RayRunner:
        import ray
        from hardbatch.trainer.driver import ray_init

        super().__enter__()
        if ray_init(""):
            self.callback(ray.shutdown)
        return self

    def train(self, job: JobConfig, num_samples: int) -> tuple[RunResult, str | None]:
        from hardbatch.trainer.launch import launch

        run = self.new_run(job)
        storage = self.out / "ray"
        done = launch(dataclasses.replace(job, run=run, redis=self.redis_url,
                                          service=self.service, storage=str(storage.resolve())))
        shutil.rmtree(storage / run, ignore_errors=True)  # checkpoints: not needed afterwards
        return done.result, (None if job.plans == "local" else run)
