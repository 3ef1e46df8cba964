"""Fixtures for the service tests: a real `hardbatch serve` (uvicorn) on loopback, real Redis.

`service` is one server per test module with a token set (reads open); tests that need other
settings start their own with `start_service`. Data goes in through the real loss store, and
the service picks it up through its materializer like in production.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hardbatch.sampler.hardness import HardnessTable
from hardbatch.sampler.records import pack
from hardbatch.services.redis_server import free_port
from hardbatch.services.store import LossStore

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-123"


@dataclass
class Service:
    """A running sampler service process."""

    url: str
    token: str | None
    proc: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, auth: bool = True) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.auth if auth else {}, timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def wait_ready(self, runs: tuple[str, ...] = (), timeout_s: float = 60.0) -> None:
        """Until /readyz is 200 and lists every run in `runs` as ready."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}")
            try:
                r = httpx.get(self.url + "/readyz", timeout=5)
                last = r.text
                body = r.json()
                if r.status_code == 200 and all(body["runs"].get(x) == "ready" for x in runs):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"service at {self.url} not ready in {timeout_s} s: {last}")


def start_service(redis_url: str, token: str | None = TOKEN, **settings: str) -> Service:
    """Starts `hardbatch serve` as a child process on a free loopback port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARDBATCH_")}
    env.update({
        "HARDBATCH_REDIS_URL": redis_url, "HARDBATCH_HOST": "127.0.0.1",
        "HARDBATCH_PORT": str(port), "HARDBATCH_REFRESH_S": "0.2",
    })
    if token:
        env["HARDBATCH_API_TOKEN"] = token
    env.update({f"HARDBATCH_{k.upper()}": v for k, v in settings.items()})
    proc = subprocess.Popen(
        [sys.executable, "-c", "from hardbatch.cli import main; main()", "serve",
         "--log-level", "warning"],
        cwd=REPO, env=env,
    )
    svc = Service(url=f"http://127.0.0.1:{port}", token=token, proc=proc, env=env)
    try:
        svc.wait_ready()
    except BaseException:
        svc.stop()
        raise
    return svc


def fill_run(store: LossStore, run: str, size: int, batches: int, per_batch: int,
             seed: int = 0, ranks: int = 2) -> HardnessTable:
    """Registers `run` and streams random loss records into it through the real store.

    Returns:
        The table those records give, computed here in-process, to compare answers with.
    """
    store.register_run(run, size)
    expected = HardnessTable(size)
    rng = np.random.default_rng(seed)
    for b in range(batches):
        ids = rng.choice(size, per_batch, replace=False)
        losses = rng.exponential(size=per_batch).astype(np.float32)
        kept = rng.random(per_batch) < 0.4
        rank = b % ranks
        store.ingest_records(run, rank, b, pack(ids, losses, kept, b, 0, rank))
        expected.apply(ids, losses, kept, b)
    return expected


@pytest.fixture(scope="module")
def service_redis_url(redis_url: str) -> str:
    """The session's Redis, database 3 (keeps these tests' keys apart from others')."""
    return redis_url.rsplit("/", 1)[0] + "/3"


@pytest.fixture(scope="module")
def store(service_redis_url: str) -> Iterator[LossStore]:
    s = LossStore.from_url(service_redis_url)
    s.client.flushdb()
    yield s
    s.client.close()


@pytest.fixture(scope="module")
def service(service_redis_url: str, store: LossStore) -> Iterator[Service]:
    """A running service with token TOKEN for state-changing endpoints."""
    svc = start_service(service_redis_url)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def filled(store: LossStore, service: Service) -> tuple[str, HardnessTable]:
    """A run `demo` of 5000 samples, partly scored, loaded by the service."""
    table = fill_run(store, "demo", 5000, batches=12, per_batch=300)
    service.wait_ready(runs=("demo",))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = httpx.get(f"{service.url}/v1/runs/demo").json()
        # Rounds lean on the priorities of the last refresh: wait until they cover the table.
        if info.get("applied_records") == info.get("priorities_records") == table.applied:
            break
        time.sleep(0.1)
    return "demo", table


@pytest.fixture
def service_factory(service_redis_url: str) -> Iterator[Callable[..., Service]]:
    """`start_service` bound to this module's Redis; stops what it started at the end."""
    started: list[Service] = []

    def start(**kwargs: Any) -> Service:
        kwargs.setdefault("redis_url", service_redis_url)
        svc = start_service(**kwargs)
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop()


@pytest.fixture(scope="session")
def fill() -> Callable[..., HardnessTable]:
    """`fill_run`, for tests that make their own runs."""
    return fill_run
