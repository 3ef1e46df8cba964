"""`hardbatch bench faults`: the faults of issue 12, injected into real runs (docs/store.md).

Four scenarios, each a 2-worker `hardbatch.launch` run with its own Redis (append-only file)
and its own `hardbatch serve` process, with one fault injected from a thread once the first
checkpoint is complete:

- `redis_restart`: Redis SIGKILLed, restarted on the same port from its file 1 s later;
- `worker_kill`: one Ray Train worker SIGKILLed (the group restarts from its last checkpoint);
- `service_kill`: the sampler service SIGKILLed, started again on the same port 2 s later;
- `redis_oom`: Redis out of memory (`maxmemory 1`, noeviction) for 5 s.

Each reports `finished`, `records_expected` (the examples the workers scored, by their own
count in each epoch's metrics, apart from the store: the epochs of the run's final history, so
an attempt superseded by a restart counts only as far as its last checkpoint),
`records_slots` (epochs x ranks x batches x batch size, what a plan that trains every slot
would give), `records_applied` (a fresh consumer replays the store afterwards), and
`final_accuracy`. Then, against one live service: `many_runs_5xx` (150 registered runs, 1,000
mixed requests) and `healthz_p99_ms_redis_stalled` (`/healthz` while Redis is SIGSTOPped 5 s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from hardbatch.sampler.records import pack
from hardbatch.services.materializer import Materializer
from hardbatch.services.redis_server import EmbeddedRedis, free_port
from hardbatch.services.store import LossStore
from hardbatch.trainer.distributed import JobConfig
from hardbatch.trainer.driver import TOKEN_ENV, ray_init, train_worker_pids
from hardbatch.trainer.launch import launch
from hardbatch.trainer.plan_source import batches_per_round

REPO = Path(__file__).resolve().parents[1]
TOKEN = "faults-bench-token"


class Service:
    """`hardbatch serve` as a child process on a fixed loopback port (so it can come back)."""

    def __init__(self, redis_url: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HARDBATCH_")}
        self.env.update({"HARDBATCH_REDIS_URL": redis_url, "HARDBATCH_HOST": "127.0.0.1",
                         "HARDBATCH_PORT": str(self.port), "HARDBATCH_REFRESH_S": "0.2",
                         TOKEN_ENV: TOKEN})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from hardbatch.cli import main; main()", "serve",
             "--log-level", "warning"], cwd=REPO, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"service at {self.url} not ready in {timeout_s} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def _redis_restart(server: EmbeddedRedis, service: Service) -> None:
    server.kill()
    time.sleep(1.0)
    server.start()


def _worker_kill(server: EmbeddedRedis, service: Service) -> None:
    pids = train_worker_pids()
    if not pids:
        raise RuntimeError("no Ray Train worker to kill")
    os.kill(pids[-1], signal.SIGKILL)


def _service_kill(server: EmbeddedRedis, service: Service) -> None:
    service.kill()
    time.sleep(2.0)
    service.start()


def _redis_oom(server: EmbeddedRedis, service: Service) -> None:
    client = LossStore.from_url(server.url).client
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    time.sleep(5.0)
    client.config_set("maxmemory", 0)
    client.close()


FAULTS: dict[str, Callable[[EmbeddedRedis, Service], None]] = {
    "redis_restart": _redis_restart,
    "worker_kill": _worker_kill,
    "service_kill": _service_kill,
    "redis_oom": _redis_oom,
}


def scenario(name: str, sizes: dict[str, Any], work: Path) -> dict[str, Any]:
    """One 2-worker run with fault `name` injected once its first checkpoint is complete."""
    storage = work / "ray"
    job = JobConfig(**sizes, run=f"faults-{name}", storage=str(storage), max_failures=3)
    slots = (job.epochs * job.workers * job.batch_size
             * batches_per_round(job.num_samples, job.workers, job.batch_size,
                                 job.plan_fraction))
    out: dict[str, Any] = {"finished": False, "records_expected": None, "records_slots": slots,
                           "records_applied": None, "final_accuracy": None}
    with EmbeddedRedis(tcp=True, appendonly=True, appendfsync="everysec",
                       data_dir=work / f"redis-{name}") as server:
        service = Service(server.url)
        service.start()
        job = dataclasses.replace(job, redis=server.url, service=service.url)
        box: dict[str, Any] = {}

        def train() -> None:
            try:
                box["done"] = launch(job)
            except Exception as e:  # the scenario's outcome, reported in the JSON
                box["error"] = f"{type(e).__name__}: {e}"

        runner = threading.Thread(target=train, daemon=True)
        t0 = time.monotonic()
        runner.start()
        try:
            # The second checkpoint's folder means every rank finished reporting the first.
            while runner.is_alive() and len(list(storage.glob(f"{job.run}/checkpoint_*"))) < 2:
                time.sleep(0.05)
            if runner.is_alive():
                FAULTS[name](server, service)
                out["fault_at_s"] = round(time.monotonic() - t0, 2)
            runner.join(600)
            done = box.get("done")
            out["finished"] = done is not None and len(done.result.epochs) == job.epochs
            if done is not None:
                # The workers' own count: the check cannot pass by construction (a store that
                # dropped or doubled records disagrees with it whatever the plan sizes were).
                out["records_expected"] = round(sum(e["scored"] for e in done.result.epochs))
                out["final_accuracy"] = done.result.epochs[-1]["val_accuracy"]
                out["resumed_at_epochs"] = done.result.config.get("resumed_at_epochs", [])
            if "error" in box:
                out["error"] = box["error"][:500]
            store = LossStore.from_url(server.url)
            m = Materializer(store, job.run, snapshot_interval_s=None, publish=False)
            m.catch_up(60)
            stats = m.stats()
            out["records_applied"] = stats.applied_records
            out["records_in_log"] = store.run_info(job.run).records
            out["superseded_records"] = stats.consumed_records - stats.applied_records \
                - stats.rejected_out_of_range - stats.rejected_nonfinite
            store.client.close()
        finally:
            service.stop()
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def _fill(store: LossStore, run: str, size: int, seed: int) -> None:
    store.register_run(run, size)
    rng = np.random.default_rng(seed)
    for rank in range(2):
        ids = rng.choice(size, 200, replace=False)
        store.ingest_records(run, rank, 1, pack(ids, rng.random(200, dtype=np.float32),
                                                rng.random(200) < 0.5, 1, 0, rank))


@contextlib.contextmanager
def _many_runs(n_runs: int, size: int, work: Path) -> Iterator[tuple[EmbeddedRedis, Service,
                                                                     list[str]]]:
    with EmbeddedRedis(tcp=True) as server:
        store = LossStore.from_url(server.url)
        runs = [f"many-{k:03d}" for k in range(n_runs)]
        for k, run in enumerate(runs):
            _fill(store, run, size, k)
        store.client.close()
        service = Service(server.url)
        service.start()
        try:
            yield server, service, runs
        finally:
            service.stop()


def mixed_requests(url: str, runs: list[str], size: int, n: int) -> dict[str, Any]:
    """`n` requests, a random mix of reads, lookups and plans over every run, 8 at a time."""
    rng = random.Random(0)
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def one(k: int, client: httpx.Client) -> int:
        run = rng.choice(runs)
        kind = k % 6
        if kind == 0:
            return client.get("/v1/runs").status_code
        if kind == 1:
            return client.get(f"/v1/runs/{run}").status_code
        if kind == 2:
            return client.get(f"/v1/runs/{run}/samples/{rng.randrange(size)}").status_code
        if kind == 3:
            ids = [rng.randrange(size) for _ in range(50)]
            return client.post(f"/v1/runs/{run}/samples/lookup", json={"ids": ids}).status_code
        if kind == 4:
            return client.get(f"/v1/runs/{run}/histogram").status_code
        plan = {"rank": 0, "world_size": 1, "round": k, "batches": 2, "batch_size": 32}
        return client.post(f"/v1/runs/{run}/plans", json=plan).status_code

    codes: list[int] = []
    lock = threading.Lock()

    def client_loop(start: int) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            for k in range(start, n, 8):
                try:
                    code = one(k, client)
                except httpx.HTTPError:
                    code = 599  # no answer at all counts as a server failure
                with lock:
                    codes.append(code)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    by_code: dict[str, int] = {}
    for c in codes:
        by_code[str(c)] = by_code.get(str(c), 0) + 1
    return {"requests": len(codes), "status_codes": by_code,
            "five_xx": sum(1 for c in codes if c >= 500),
            "seconds": round(time.perf_counter() - t0, 2)}


def healthz_while_stalled(server: EmbeddedRedis, url: str, stall_s: float) -> dict[str, Any]:
    """`/healthz` every 20 ms while Redis is SIGSTOPped for `stall_s`."""
    assert server.process is not None
    times: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        client.get("/healthz")
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            end = time.monotonic() + stall_s
            while time.monotonic() < end:
                t0 = time.perf_counter()
                client.get("/healthz").raise_for_status()
                times.append(time.perf_counter() - t0)
                time.sleep(0.02)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
    ms = np.array(times) * 1000
    return {"requests": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2)}


def run(quick: bool, out: Path) -> dict[str, Any]:
    import ray

    sizes = dict(workers=2, num_samples=4000 if quick else 8000, width=32 if quick else 48,
                 batch_size=128, epochs=4 if quick else 5, progress=False, plans="service")
    scenarios = ["worker_kill"] if quick else list(FAULTS)
    work = out / "faults-work"
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"quick": quick, "sizes": sizes,
                              "load_average": os.getloadavg()}
    # The workers' token for plan requests (ray_init hands it to them), for these runs only:
    # left set, it would reach every later service client of this process.
    before = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = TOKEN
    try:
        ray_init("")
        for name in scenarios:
            result[name] = scenario(name, sizes, work)
            print(name, result[name], flush=True)
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = before
    n_runs, n_requests = (30, 200) if quick else (150, 1000)
    with _many_runs(n_runs, 2000, work) as (server, service, runs):
        many = mixed_requests(service.url, runs, 2000, n_requests)
        stalled = healthz_while_stalled(server, service.url, 2.0 if quick else 5.0)
    result["many_runs"] = {"runs": n_runs, **many}
    result["many_runs_5xx"] = many["five_xx"]
    result["healthz_redis_stalled"] = stalled
    result["healthz_p99_ms_redis_stalled"] = stalled["p99_ms"]
    for name in scenarios:
        r = result[name]
        ok = r["finished"] and r["records_applied"] == r["records_expected"]
        print(f"{name:14s} finished={r['finished']} applied={r['records_applied']} "
              f"expected={r['records_expected']} acc={r['final_accuracy']} "
              f"{'OK' if ok else 'MISMATCH'}")
    print(f"many runs: {n_runs} runs, {many['requests']} requests, 5xx={many['five_xx']}; "
          f"/healthz p99 with Redis stopped: {stalled['p99_ms']} ms")
    return result
