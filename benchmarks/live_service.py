"""A real Redis, a run filled through the real store, and `hardbatch serve` on loopback.

Shared by the service benchmarks (`plan`, `lookup-load`); everything is stopped on exit.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from hardbatch.sampler.records import pack
from hardbatch.services.redis_server import EmbeddedRedis, free_port
from hardbatch.services.store import LossStore

REPO = Path(__file__).resolve().parents[1]


@dataclass
class LiveService:
    url: str
    run: str
    num_samples: int
    token: str


def fill(store: LossStore, run: str, size: int, seen_fraction: float, seed: int = 0,
         batch: int = 1 << 16) -> int:
    """Registers `run` and scores the first `seen_fraction` of ids once, in random order."""
    store.register_run(run, size)
    rng = np.random.default_rng(seed)
    n_seen = int(size * seen_fraction)
    ids = rng.permutation(size)[:n_seen].astype(np.uint32)
    for seq, start in enumerate(range(0, n_seen, batch)):
        part = ids[start:start + batch]
        losses = rng.exponential(size=len(part)).astype(np.float32)
        kept = rng.random(len(part)) < 0.3
        store.ingest_records(run, 0, seq, pack(part, losses, kept, seq, 0, 0))
    return n_seen


@contextlib.contextmanager
def live_service(size: int, seen_fraction: float = 1.0, run: str = "bench",
                 ready_timeout_s: float = 300.0) -> Iterator[LiveService]:
    """Yields a service answering for `run` with its table fully loaded."""
    token = "bench-token"
    with EmbeddedRedis(tcp=True) as server:
        store = LossStore.from_url(server.url)
        records = fill(store, run, size, seen_fraction)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("HARDBATCH_")}
        env.update({"HARDBATCH_REDIS_URL": server.url, "HARDBATCH_PORT": str(port),
                    "HARDBATCH_API_TOKEN": token, "HARDBATCH_REFRESH_S": "1.0",
                    # No table snapshots during the measurement: they are not what is measured.
                    "HARDBATCH_SNAPSHOT_INTERVAL_S": "3600"})
        proc = subprocess.Popen(
            [sys.executable, "-m", "hardbatch.cli", "serve",
             "--log-level", "warning"], cwd=REPO, env=env,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_loaded(url, run, records, proc, ready_timeout_s)
            yield LiveService(url=url, run=run, num_samples=size, token=token)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            store.client.close()


def _wait_loaded(url: str, run: str, records: int, proc: subprocess.Popen[bytes],
                 timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}")
        try:
            info = httpx.get(f"{url}/v1/runs/{run}", timeout=10).json()
            if info.get("applied_records") == records:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"service did not load {records} records of {run} in {timeout_s} s")
