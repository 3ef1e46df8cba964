"""Launches a distributed hardbatch run: what `hardbatch train` does.

With no addresses it starts everything on this machine (a Ray local cluster, an embedded Redis,
the sampler service in this process) and stops it all at the end; with `--address`,
`--service` and `--redis` it joins existing ones.

Example:
    >>> from hardbatch.trainer.distributed import JobConfig
    >>> result = launch(JobConfig(workers=2, epochs=2))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hardbatch.trainer.distributed import STATE_FILE, JobConfig, worker_loop
from hardbatch.trainer.plan_source import batches_per_round
from hardbatch.trainer.task import TaskArgs, load_task
from hardbatch.trainer.train import RunResult

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
    """Runs the sampler service under uvicorn in a thread of this process; yields its URL."""
    import httpx
    import uvicorn
    from hardbatch.services.core.config import Settings
    from hardbatch.services.main import create_app

    port = port or _free_port(host)
    settings = Settings(host=host, port=port, redis_url=redis_url, refresh_s=0.5)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="sampler-service", daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the sampler service did not start on {url}")
        time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def _ray_init(address: str) -> bool:
    """Connects to (or starts) Ray; returns whether this process started the cluster."""
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
    ray.init(include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)
    return True


def _use_gpu(job: JobConfig) -> bool:
    return job.use_gpu == "yes" or (job.use_gpu == "auto" and torch.cuda.is_available())


@dataclasses.dataclass
class JobResult:
    """A finished run: its metrics (as rank 0 checkpointed them) and its hardest samples."""

    run: str
    result: RunResult
    hardest: list[dict[str, Any]]
    info: dict[str, Any]


def launch(job: JobConfig, top_k: int = 10) -> JobResult:
    """Trains `job` on Ray Train workers with service plans and the loss store.

    Args:
        job: the run.
        top_k: how many of the hardest samples to fetch from the service at the end.
    """
    import ray
    from hardbatch.services.client import SamplerClient, SamplerError
    from hardbatch.services.redis_server import redis_url_or_embedded
    from hardbatch.services.store import LossStore
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run = job.run or f"hb-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    task = load_task(job.task)(TaskArgs(job.num_samples, job.width, job.seed,
                                        dict(job.task_args)))
    if job.plan_fraction * task.num_samples < job.workers * job.batch_size:
        raise ValueError(
            f"a round of {job.plan_fraction} x {task.num_samples} samples cannot give "
            f"{job.workers} workers a batch of {job.batch_size} each")
    # Remote storage (s3://, gs://, ...) is Ray's business; a local path is made absolute.
    storage = job.storage or "runs/ray"
    if "://" not in storage:
        storage = str(Path(storage).resolve())
        # Ray Train resumes from whatever checkpoints it finds under storage/run: a rerun of a
        # named run must not silently return the old run's results.
        if not job.resume and (Path(storage) / run).exists():
            raise ValueError(f"run {run!r} already has checkpoints in {Path(storage) / run}; "
                             "pass --resume to continue it, or choose another --run")
    with contextlib.ExitStack() as stack:
        # An embedded Redis keeps an append-only file beside the checkpoints and is restarted
        # if it dies, so the run's store outlives a crash of its server (docs/store.md).
        aof = (Path(storage).parent if "://" not in storage else Path("runs")) / "redis" / run
        redis_url = stack.enter_context(redis_url_or_embedded(
            job.redis or None, tcp=True, appendonly=True, data_dir=aof, supervise=True))
        store = LossStore.from_url(redis_url)
        store.register_run(run, task.num_samples)
        store.client.close()
        service = job.service or stack.enter_context(local_service(redis_url))
        with SamplerClient(service, token=os.environ.get(TOKEN_ENV) or None) as client:
            client.set_plan_config(run, alpha=job.alpha, lam=job.lam, total_rounds=job.epochs)
        started = _ray_init(job.address)
        if started:
            stack.callback(ray.shutdown)
        config = dataclasses.replace(job, run=run, redis=redis_url, service=service)
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config=dataclasses.asdict(config),
            scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=_use_gpu(job),
                                         placement_strategy=job.placement,
                                         resources_per_worker={"CPU": 1}),
            run_config=RunConfig(
                name=run, storage_path=storage,
                failure_config=FailureConfig(max_failures=job.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        if job.progress and job.plans == "service":
            steps = batches_per_round(task.num_samples, job.workers, job.batch_size,
                                      job.plan_fraction)
            total = job.epochs * steps * job.batch_size * job.workers
            result = _fit_following(trainer, service, run, total)
        else:
            result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"run {run} failed: {result.error}") from result.error
        assert result.checkpoint is not None, "a finished run always has a checkpoint"
        with result.checkpoint.as_directory() as d:
            state: dict[str, Any] = torch.load(Path(d) / STATE_FILE, weights_only=True)
        out = RunResult(**state["result"])
        out.config.update(run=run, workers=job.workers, service=service)
        hardest: list[dict[str, Any]] = []
        info: dict[str, Any] = {}
        try:
            with SamplerClient(service, token=os.environ.get(TOKEN_ENV) or None) as client:
                hardest = _settled_top(client, run, top_k)
                info = client.run_info(run)
        except SamplerError as e:  # the run is done and checkpointed: report, don't lose it
            log.warning("run %s finished, but the service did not answer: %s", run, e)
        return JobResult(run, out, hardest, info)


def _fit_following(trainer: Any, service: str, run: str, total: int) -> Any:
    """Runs `trainer.fit()` with a progress bar of the examples the store has materialized:
    the bar follows the data flow itself, not a worker's stdout."""
    from hardbatch.services.client import SamplerClient, SamplerError
    from tqdm.auto import tqdm

    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    with SamplerClient(service, token=os.environ.get(TOKEN_ENV) or None, timeout_s=2) as client, \
            tqdm(total=total, desc=f"run {run}", unit="ex", unit_scale=True) as bar:
        while thread.is_alive():
            thread.join(1.0)
            with contextlib.suppress(SamplerError):
                info = client.run_info(run)
                bar.update(min(int(info.get("applied_records") or 0), total) - bar.n)
                if info.get("kept_fraction") is not None:
                    bar.set_postfix(kept=f"{info['kept_fraction']:.2f}")
    if "error" in box:
        raise box["error"]
    return box["result"]


def _settled_top(client: Any, run: str, k: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The hardest samples once the service has applied every record (or after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while client.run_info(run).get("lag_records", 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    top: list[dict[str, Any]] = client.top(run, k=k)
    return top
