"""The Ray Train worker: the training loop of `hardbatch.trainer.train` as one rank of a DDP job.

Each worker gets its batches from the sampler service (`RoundPlans`), filters them locally,
takes a DDP step normalized by the kept count over all ranks, streams its losses to the loss
store, and reports metrics with a checkpoint after every epoch so a failed worker group
resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hardbatch.trainer.train import Runtime, TrainConfig, fit

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"


@dataclass
class JobConfig(TrainConfig):
    """A distributed run. Field docs double as `hardbatch train --help`."""

    workers: int = field(default=2, metadata={"help": "Training workers (DDP ranks)."})
    run: str = field(default="", metadata={"help": "Run name at the store [default: hb-<time>]."})
    address: str = field(default="", metadata={
        "help": "Ray cluster to join (auto, ray://HOST:10001); empty: start a local one."})
    service: str = field(default="", metadata={
        "help": "Sampler service URL; empty: start one in this process."})
    redis: str = field(default="", metadata={
        "help": "Redis URL of the loss store; empty: $HARDBATCH_REDIS_URL or an embedded one."})
    plans: str = field(default="service", metadata={
        "help": "Where batches come from: service (hard-biased plans, losses streamed to the "
                "store) or local (a seeded shuffle, nothing streamed: plain DDP)."})
    plan_fraction: float = field(default=1.0, metadata={
        "help": "Share of the dataset each epoch's plans cover; below 1 the service picks "
                "that share, biased toward hard examples."})
    alpha: float = field(default=1.0, metadata={
        "help": "Plan priority exponent on hardness (0: uniform)."})
    lam: float = field(default=0.1, metadata={
        "help": "Uniform floor of the plan distribution, so no sample starves."})
    placement: str = field(default="PACK", metadata={
        "help": "Placement of workers on nodes: PACK, SPREAD, STRICT_SPREAD, STRICT_PACK."})
    max_failures: int = field(default=2, metadata={
        "help": "Worker-group failures to recover from (from the last checkpoint)."})
    storage: str = field(default="", metadata={
        "help": "Where Ray Train keeps checkpoints [default: runs/ray under this folder]."})
    use_gpu: str = field(default="auto", metadata={"help": "yes, no, or auto (if CUDA)."})
    resume: bool = field(default=False, metadata={
        "help": "Continue --run from its last checkpoint in --storage (else a run name that "
                "already has checkpoints is refused)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.plans not in ("service", "local"):
            raise ValueError(f"plans must be service or local, got {self.plans!r}")
        if not 0.0 < self.plan_fraction <= 1.0:
            raise ValueError(f"plan_fraction must be in (0, 1], got {self.plan_fraction}")
        if self.alpha < 0 or not 0.0 <= self.lam <= 1.0:
            raise ValueError("need alpha >= 0 and lam in [0, 1]")
        if self.placement not in ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"):
            raise ValueError(f"unknown placement {self.placement!r}")
        if self.max_failures < -1:
            raise ValueError("max_failures must be >= -1 (-1: retry forever)")
        if self.use_gpu not in ("yes", "no", "auto"):
            raise ValueError(f"use_gpu must be yes, no or auto, got {self.use_gpu!r}")

    def train_config(self) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


def _all_reducer(device: torch.device) -> Callable[[list[float]], list[float]]:
    """Sums over ranks on `device`: NCCL reduces only CUDA tensors, gloo CPU ones."""

    def all_reduce(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    return all_reduce


def _quiet_logs() -> None:
    """Drops INFO lines that repeat, per plan and per epoch, what the progress bar shows."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if "ray/train" in name or name.startswith("ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)


def worker_loop(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    from hardbatch.services.client import SamplerClient
    from hardbatch.trainer.plan_source import RoundPlans
    from hardbatch.trainer.reporter import LossReporter

    _quiet_logs()
    job = JobConfig(**cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    config = dataclasses.replace(job.train_config(), threads=job.threads or 1,
                                 device=str(device))
    service = job.plans == "service"
    token = os.environ.get("HARDBATCH_API_TOKEN") or None  # plans are a write: they need it
    client = SamplerClient(job.service, token=token) if service and job.service else None
    plans = RoundPlans(client, job.run, rank, world, job.batch_size, job.plan_fraction,
                       job.seed, rounds=job.epochs)
    reporter = LossReporter(job.redis, job.run, rank) if service and job.redis else None

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / STATE_FILE, weights_only=True)
        log.info("rank %d resumes at epoch %d", rank, resume["epoch"])

    def on_epoch_end(state: dict[str, Any]) -> None:
        last = state["result"]["epochs"][-1]
        metrics = {**last, "service_rounds": plans.service_rounds,
                   "fallback_rounds": plans.fallback_rounds}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    runtime = Runtime(rank=rank, world_size=world, wrap=ray.train.torch.prepare_model,
                      all_reduce=_all_reducer(device), plans=plans, steps_per_epoch=plans.steps,
                      on_epoch_end=on_epoch_end, resume=resume)
    try:
        fit(config, reporter=reporter, runtime=runtime)
    finally:
        plans.close()
        if reporter is not None:
            delivery = reporter.close(timeout_s=60)
            if not delivery.ok:
                log.error("rank %d: loss records not delivered: %s", rank, delivery)
        if client is not None:
            client.close()
