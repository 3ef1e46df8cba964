"""The driver side of a run: the loss store, the sampler service, the run, Ray.

    with Driver(num_samples=len(train_set), rounds=epochs) as driver:
        trainer = TorchTrainer(train_loop, train_loop_config={"hardbatch": driver.worker_config},
                               scaling_config=ScalingConfig(num_workers=2))
        trainer.fit()
        print(driver.top(10))

With no addresses it starts what is missing on this machine (an embedded Redis, the sampler
service in a child process, a Ray local cluster) and stops it at the end; given
addresses, it joins them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from hardbatch.sampler.plans import PlanConfig
from hardbatch.services import lifelines
from hardbatch.trainer.worker import WorkerConfig

log = logging.getLogger(__name__)

# Ray 2.60 polls workers every ~2 s by default, so each `ray.train.report` costs that much.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_DEDUP_LOGS": "1"}
# The sampler service's bearer token (plans are a write): this process and every worker need it.
TOKEN_ENV = "HARDBATCH_API_TOKEN"


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_service(redis_url: str, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Runs the sampler service (`hardbatch serve`) in a child process; yields its URL.

    A process, not a thread of this one: the service's background work (ingesting loss
    records, rebuilding priorities twice a second) would hold this process's GIL between the
    ops of a training loop running here. Measured on the tabular task, one process, 4 epochs
    (docs/architecture.md): 4.11 s in a thread, 2.87 s in a process, plain training 2.1-2.3 s.
    The child ends with this context, and with this process if it dies (Linux).
    """
    import httpx

    port = port or _free_port(host)
    env = dict(os.environ, HARDBATCH_HOST=host, HARDBATCH_PORT=str(port),
               HARDBATCH_REDIS_URL=redis_url, HARDBATCH_REFRESH_S="0.5")
    # Tied to this thread, not the process: the child lives inside this `with`, in this thread.
    proc = subprocess.Popen([sys.executable, "-m", "hardbatch.cli", "serve",
                             "--log-level", "warning"], env=env,
                            preexec_fn=lifelines.die_with_this_thread())
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the sampler service did not start on {url} (exit code "
                                   f"{proc.poll()}; its stderr is above)")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def train_worker_pids() -> list[int]:
    """Ray Train workers of this process's Ray cluster (its raylet is our child; other Ray
    clusters may run on the machine at the same time)."""
    pids = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "RayTrainWorker" in " ".join(p.cmdline()):
                pids.append(p.pid)
    return pids


def ray_init(address: str = "") -> bool:
    """Connects to Ray at `address` ("" : start a local cluster) unless this process already
    is; returns whether it started a cluster. Workers get `RAY_ENV` and the service token."""
    import ray

    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": {k: os.environ[k] for k in RAY_ENV}}
    if os.environ.get(TOKEN_ENV):
        runtime_env["env_vars"][TOKEN_ENV] = os.environ[TOKEN_ENV]
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return False
    # With the dashboard comes the State API, which Ray Train's placement-group cleaner polls
    # every second: without it the cleaner cannot work and says so, once a second, all run long.
    ray.init(include_dashboard=True, runtime_env=runtime_env, log_to_driver=True)
    return True


def new_run_name() -> str:
    """hb-<time>-<random>: unique enough for runs started by hand."""
    return f"hb-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


class Driver:
    """Brings up (or joins) the loss store and the sampler service and registers a run, for
    workers started by your own `TorchTrainer`. Use it as a context manager.

    Args:
        num_samples: size of the training set (sample ids are 0..num_samples-1).
        rounds: rounds (epochs) the run trains; the service anneals and stops prefetch by it.
        run: run name at the store [default: hb-<time>-<random>].
        plans: "service" (hard-biased plans, losses streamed to the store) or "local" (each
            rank shuffles its shard, nothing is started or streamed: plain data-parallel).
        redis: Redis URL of the loss store; empty: $HARDBATCH_REDIS_URL or an embedded one.
        service: sampler service URL; empty: start one in this process.
        ray_address: Ray to join ("auto", "ray://HOST:10001"), "" to start a local cluster if
            this process has none, or None to leave Ray alone.
        plan: how plans lean toward hard samples (`PlanConfig`: alpha, lam, beta, ...);
            `total_rounds` is set from `rounds`. The workers apply the plans' weights when
            they carry importance weights (`beta > 0`), the noise guard is on (weight 0 for
            a suspected label error, whatever beta) or the size is adaptive (slots not to
            train are marked by weight -1).
        worker: the workers' filter settings and plan fraction (`WorkerConfig`); its run,
            service, redis and rounds are filled in here.
        store_dir: where an embedded Redis keeps its append-only file (fsync every second);
            it is then restarted if it dies, and the run's store outlives a crash of its
            server (docs/store.md). None: an embedded Redis keeps nothing on disk.

    Example:
        >>> with Driver(num_samples=4000, rounds=3, plan=PlanConfig(alpha=1.0)) as driver:
        ...     config = {"hardbatch": driver.worker_config}  # doctest: +SKIP
    """

    def __init__(self, num_samples: int, rounds: int, *, run: str = "", plans: str = "service",
                 redis: str = "", service: str = "", ray_address: str | None = "",
                 plan: PlanConfig | None = None, worker: WorkerConfig | None = None,
                 store_dir: str | os.PathLike[str] | None = None) -> None:
        if num_samples < 1 or rounds < 1:
            raise ValueError(f"need num_samples >= 1 and rounds >= 1, got {num_samples}, "
                             f"{rounds}")
        if plans not in ("service", "local"):
            raise ValueError(f"plans must be service or local, got {plans!r}")
        self.num_samples, self.rounds, self.plans = num_samples, rounds, plans
        self.run = run or new_run_name()
        self._worker = worker or WorkerConfig()
        plan = plan or PlanConfig()
        # The plans of a run follow its seed, not its name (two runs of a seed: the same plans).
        self.plan = dataclasses.replace(plan, total_rounds=rounds, seed=(
            self._worker.seed if plan.seed is None else plan.seed))
        self._redis, self._service, self._ray_address = redis, service, ray_address
        self._store_dir = store_dir
        self.redis_url, self.service_url = "", ""
        self._stack: contextlib.ExitStack | None = None

    @property
    def worker_config(self) -> dict[str, Any]:
        """What every `Worker` needs, as a dict for Ray's `train_loop_config`."""
        if self._stack is None:
            raise RuntimeError("enter the Driver (`with Driver(...) as driver:`) first")
        return dataclasses.replace(
            self._worker, run=self.run, service=self.service_url, redis=self.redis_url,
            importance_weights=self._worker.importance_weights or self.plan.weighs_samples,
        ).to_dict()

    def __enter__(self) -> Driver:
        from hardbatch.services.redis_server import redis_url_or_embedded
        from hardbatch.services.store import LossStore

        stack = contextlib.ExitStack().__enter__()
        try:
            if self.plans == "service":
                persist = ({"appendonly": True, "data_dir": Path(self._store_dir),
                            "supervise": True} if self._store_dir is not None else {})
                self.redis_url = stack.enter_context(
                    redis_url_or_embedded(self._redis or None, tcp=True, **persist))
                store = LossStore.from_url(self.redis_url)
                try:
                    store.register_run(self.run, self.num_samples)
                finally:
                    store.client.close()
                self.service_url = self._service or stack.enter_context(
                    local_service(self.redis_url))
                with self.client() as client:
                    config = {k: v for k, v in dataclasses.asdict(self.plan).items()
                              if v is not None}
                    client.set_plan_config(self.run, **config)
            if self._ray_address is not None and ray_init(self._ray_address):
                import ray

                stack.callback(ray.shutdown)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            self._stack.close()

    def client(self, timeout_s: float = 10.0) -> Any:
        """A `SamplerClient` on the run's service (close it, or use it in `with`)."""
        from hardbatch.services.client import SamplerClient

        if not self.service_url:
            raise RuntimeError("no sampler service: the run has plans='local'")
        return SamplerClient(self.service_url, token=os.environ.get(TOKEN_ENV) or None,
                             timeout_s=timeout_s)

    def top(self, k: int = 10, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """The `k` hardest samples, once the service has applied every record (or after
        `timeout_s`): dicts with id, ema, last_loss, seen, kept."""
        with self.client() as client:
            deadline = time.monotonic() + timeout_s
            while (client.run_info(self.run).get("lag_records", 0) > 0
                   and time.monotonic() < deadline):
                time.sleep(0.2)
            top: list[dict[str, Any]] = client.top(self.run, k=k)
        return top

    def info(self) -> dict[str, Any]:
        """The run's counters at the service (records, lag, kept fraction, ...)."""
        with self.client() as client:
            info: dict[str, Any] = client.run_info(self.run)
        return info
