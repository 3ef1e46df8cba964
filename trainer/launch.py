"""Launches a distributed hardbatch run: what `hardbatch train` does.

A `Driver` brings up (or joins) Redis, the sampler service and Ray and registers the run; this
module adds the built-in loop (`worker_loop`) on a `TorchTrainer`, a progress bar and the
results.

Example:
    >>> from hardbatch.trainer.distributed import JobConfig
    >>> result = launch(JobConfig(workers=2, epochs=2))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

import torch
from hardbatch.trainer.distributed import STATE_FILE, JobConfig, worker_loop
from hardbatch.trainer.driver import Driver, new_run_name
from hardbatch.trainer.plan_source import batches_per_round
from hardbatch.trainer.task import TaskArgs, load_task
from hardbatch.trainer.train import RunResult

log = logging.getLogger(__name__)


def _quiet_train_logs() -> dict[str, Any]:
    """Ray Train's own INFO lines (resources requested, worker group started, process group
    set up) would come between the progress bar and the tables: warnings and errors only."""
    import ray.train

    logging_config = getattr(ray.train, "LoggingConfig", None)  # Ray Train V2 has it
    return {} if logging_config is None else {"logging_config": logging_config("WARNING")}


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
    from hardbatch.services.client import SamplerError
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    task = load_task(job.task)(TaskArgs(job.num_samples, job.width, job.seed,
                                        dict(job.task_args)))
    batch = job.scored_batch_size
    if job.plan_fraction * task.num_samples < job.workers * batch:
        raise ValueError(
            f"a round of {job.plan_fraction} x {task.num_samples} samples cannot give "
            f"{job.workers} workers a batch of {batch} each")
    run = job.run or new_run_name()
    # Remote storage (s3://, gs://, ...) is Ray's business; a local path is made absolute.
    storage = job.storage or "runs/ray"
    # An embedded Redis keeps an append-only file beside the checkpoints (docs/store.md).
    store_dir = (Path(storage).resolve().parent if "://" not in storage
                 else Path("runs").resolve()) / "redis" / run
    driver = Driver(task.num_samples, job.epochs, run=run, plans=job.plans, redis=job.redis,
                    service=job.service, ray_address=job.address, plan=job.plan_config(),
                    worker=job.worker_config(), store_dir=store_dir)
    if "://" not in storage:
        storage = str(Path(storage).resolve())
        # Ray Train resumes from whatever checkpoints it finds under storage/run: a rerun of a
        # named run must not silently return the old run's results.
        if not job.resume and (Path(storage) / driver.run).exists():
            raise ValueError(f"run {driver.run!r} already has checkpoints in "
                             f"{Path(storage) / driver.run}; pass --resume to continue it, or "
                             "choose another --run")
    with driver:
        run = driver.run
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={**dataclasses.asdict(job), "hardbatch": driver.worker_config},
            scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=_use_gpu(job),
                                         placement_strategy=job.placement,
                                         resources_per_worker={"CPU": 1}),
            run_config=RunConfig(
                name=run, storage_path=storage,
                failure_config=FailureConfig(max_failures=job.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2), **_quiet_train_logs()),
        )
        if job.progress and driver.service_url:
            steps = batches_per_round(task.num_samples, job.workers, batch, job.plan_fraction)
            total = job.epochs * steps * batch * job.workers
            result = _fit_following(trainer, driver, total)
        else:
            result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"run {run} failed: {result.error}") from result.error
        assert result.checkpoint is not None, "a finished run always has a checkpoint"
        with result.checkpoint.as_directory() as d:
            state: dict[str, Any] = torch.load(Path(d) / STATE_FILE, weights_only=True)
        out = RunResult(**state["result"])
        out.config.update(run=run, workers=job.workers, service=driver.service_url)
        hardest: list[dict[str, Any]] = []
        info: dict[str, Any] = {}
        if driver.service_url:
            try:
                hardest, info = driver.top(top_k), driver.info()
            except SamplerError as e:  # the run is done and checkpointed: report, don't lose it
                log.warning("run %s finished, but the service did not answer: %s", run, e)
        return JobResult(run, out, hardest, info)


def _fit_following(trainer: Any, driver: Driver, total: int) -> Any:
    """Runs `trainer.fit()` with a progress bar of the examples the store has materialized:
    the bar follows the data flow itself, not a worker's stdout."""
    from hardbatch.services.client import SamplerError
    from tqdm.auto import tqdm

    run = driver.run
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    with driver.client(timeout_s=2) as client, \
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
