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
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
from hardbatch.services.client import SamplerClient
from hardbatch.services.redis_server import redis_url_or_embedded
from hardbatch.services.store import LossStore
from hardbatch.trainer.distributed import JobConfig
from hardbatch.trainer.launch import local_service
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

    def register(self, run: str, job: JobConfig, num_samples: int) -> None:
        """What `launch` does before training: the run and its plan config at the store."""
        self.store.register_run(run, num_samples)
        self.client.set_plan_config(run, alpha=job.alpha, lam=job.lam, total_rounds=job.epochs)

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
    """One process: the training loop here, the service in a thread of this process."""

    def train(self, job: JobConfig, num_samples: int) -> tuple[RunResult, str | None]:
        from hardbatch.trainer.plan_source import RoundPlans
        from hardbatch.trainer.reporter import LossReporter
        from hardbatch.trainer.train import Runtime, fit

        if job.plans == "local":
            return fit(job.train_config()), None
        run = self.new_run(job)
        self.register(run, job, num_samples)
        plans = RoundPlans(self.client, run, 0, 1, job.batch_size, job.plan_fraction, job.seed,
                           rounds=job.epochs)
        reporter = LossReporter(self.redis_url, run, 0)
        try:
            result = fit(job.train_config(), reporter=reporter,
                         runtime=Runtime(plans=plans, steps_per_epoch=plans.steps))
        finally:
            plans.close()
            delivery = reporter.close(timeout_s=60)
        if not delivery.ok:
            raise RuntimeError(f"run {run}: loss records not delivered: {delivery}")
        if plans.fallback_rounds:
            raise RuntimeError(f"run {run}: {plans.fallback_rounds} round(s) trained on a local "
                               "shuffle: the service did not answer")
        return result, run


class RayRunner(Runner):
    """Ray Train workers via `launch`, on one Ray cluster started once for the benchmark."""

    def __enter__(self) -> RayRunner:
        import ray
        from hardbatch.trainer.launch import _ray_init

        super().__enter__()
        if _ray_init(""):
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


def suspect_route(service: str) -> tuple[str, dict[str, Any]] | None:
    """How to list a run's suspected label errors at this service, if it can: a GET route
    with "suspect" in its path, or a samples listing whose `order` admits "suspect". Read
    from the service's OpenAPI document, so the benchmark follows whatever the service offers.
    """
    spec = httpx.get(f"{service}/openapi.json", timeout=10).json()
    paths: dict[str, Any] = spec.get("paths", {})
    for path, ops in sorted(paths.items()):
        if "suspect" in path and "{run}" in path and "get" in ops and "{" not in \
                path.replace("{run}", ""):
            return path, _limit_param(ops["get"])
    listing = paths.get("/v1/runs/{run}/samples", {}).get("get", {})
    for p in listing.get("parameters", []):
        if p.get("name") == "order" and "suspect" in json.dumps(p.get("schema", {})):
            return "/v1/runs/{run}/samples", {"order": "suspect", **_limit_param(listing)}
    return None


def _limit_param(op: dict[str, Any]) -> dict[str, Any]:
    names = {p.get("name") for p in op.get("parameters", [])}
    return {"limit": 10_000} if "limit" in names else {}  # the service's default max_limit


def suspect_ids(service: str, route: tuple[str, dict[str, Any]], run: str) -> list[int]:
    """The ids the service lists as suspected label errors of `run`."""
    path, params = route
    resp = httpx.get(f"{service}{path.replace('{run}', run)}", params=params, timeout=30)
    resp.raise_for_status()
    body = resp.json()
    if isinstance(body, dict) and isinstance(body.get("samples"), list):
        return [int(s["id"]) for s in body["samples"]]
    if isinstance(body, dict) and isinstance(body.get("ids"), list):
        return [int(i) for i in body["ids"]]
    if isinstance(body, list):
        return [int(s["id"]) if isinstance(s, dict) else int(s) for s in body]
    raise ValueError(f"cannot read sample ids from the suspect listing of {path}")
