"""The Ray Train worker: the training loop of `hardbatch.trainer.train` as one rank of a DDP job.

The loop's `Worker` gets its batches from the sampler service (local shuffle while it is
away), filters them locally, normalizes the loss by the kept count over all ranks and streams
its losses to the loss store; here each epoch ends with metrics and a checkpoint, so a failed
worker group resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hardbatch.sampler.plans import PlanConfig
from hardbatch.trainer.train import Runtime, TrainConfig, fit
from hardbatch.trainer.worker import WorkerConfig

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
        "help": "Share of the dataset each epoch's plans cover; below 1 the service picks that "
                "share, biased toward examples still being learned, so the well-learned are not "
                "even scored (1: every sample, the service only orders them; suspected label "
                "errors are never trained on). 0.5 with --beta 0 --priority uncertain stays "
                "safe with flipped labels but was no faster than 1: see the README's frontier."})
    keep_steps: bool = field(default=False, metadata={
        "help": "With --plan-fraction below 1, keep an epoch's steps (and so the LR schedule) "
                "and score plan_fraction x batch_size samples a step, the ones the service "
                "picks, rather than train fewer full batches. 0.4 with --beta 0 beat uniform "
                "plans of that size on MNIST-1D (1.2x one process, 1.08x two workers) but "
                "lost 1.3 points on the tabular task: see the README's frontier."})
    size_factor: float = field(default=4.0, metadata={
        "help": "Adaptive plan size: each epoch keeps its steps but the service's plans train on "
                "this many times the share of samples carrying min_loss_perc of the last "
                "losses (all of them while losses are spread: early epochs, flat tasks), "
                "hard-biased; the rest are not even loaded. 0: plans over all the data, the "
                "service only orders them."})
    packed: bool = field(default=True, metadata={
        "help": "With an adaptive size, train each epoch's chosen samples as fewer, full "
                "batches (the LR schedule follows progress, so it still decays fully); off: "
                "keep every step and shrink the batches (pays only where a step's cost "
                "shrinks with its batch)."})
    alpha: float = field(default=1.0, metadata={
        "help": "Plan priority exponent on hardness, in [0, 16] (0: uniform)."})
    priority: str = field(default="loss", metadata={
        "help": "How the plans rank samples: loss (the hardest first) or uncertain (p (1 - p) "
                "with p = exp(-loss): confidently wrong samples, often label errors, rank low)."})
    lam: float = field(default=0.1, metadata={
        "help": "Uniform floor of the plan distribution, so no sample starves."})
    beta: float = field(default=0.0, metadata={
        "help": "Importance-weight exponent in [0, 1] (1: unbiased plans, 0: no weights, a "
                "plain hard bias, which trained better in every measured case; matters only "
                "where plans leave samples out: an adaptive size or --plan-fraction below 1)."})
    guard: bool = field(default=True, metadata={
        "help": "Noise guard: the service flags samples whose loss stays high over many "
                "scorings as suspected label errors (listed over REST) and they are never "
                "trained on; it engages only when 2% of the scored samples match."})
    anneal_frac: float = field(default=0.125, metadata={
        "help": "Share of the last epochs whose plans are uniform (InfoBatch's annealing)."})
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
        # Checked where they are used, before anything starts: the workers' plan fraction,
        # the service's alpha and lam.
        self.worker_config()
        self.plan_config()
        if self.placement not in ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"):
            raise ValueError(f"unknown placement {self.placement!r}")
        if self.max_failures < -1:
            raise ValueError("max_failures must be >= -1 (-1: retry forever)")
        if self.use_gpu not in ("yes", "no", "auto"):
            raise ValueError(f"use_gpu must be yes, no or auto, got {self.use_gpu!r}")

    def plan_config(self) -> PlanConfig:
        """How the service's plans lean toward hard samples."""
        plan = PlanConfig(alpha=self.alpha, lam=self.lam, beta=self.beta, priority=self.priority,
                          anneal_frac=self.anneal_frac, total_rounds=self.epochs,
                          size_factor=self.size_factor, size_mass=self.min_loss_perc,
                          packed=self.packed)
        return plan if self.guard else dataclasses.replace(plan, suspect_factor=0.0)

    def worker_config(self, **overrides: Any) -> WorkerConfig:
        """The workers' filter settings and plan fraction (plus `overrides`)."""
        return super().worker_config(**{"plan_fraction": self.plan_fraction, **overrides})

    @property
    def scored_batch_size(self) -> int:
        """Samples a worker scores per step: `batch_size`, or its `plan_fraction` share with
        `keep_steps` (the steps of an epoch over plans of that share stay those of a full one).
        """
        if not self.keep_steps:
            return self.batch_size
        return max(1, round(self.batch_size * self.plan_fraction))

    def train_config(self) -> TrainConfig:
        """The training loop's config; its `batch_size` is what a step scores."""
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{**{k: v for k, v in dataclasses.asdict(self).items()
                                 if k in names}, "batch_size": self.scored_batch_size})


def _quiet_logs() -> None:
    """Drops INFO lines that repeat, per plan and per epoch, what the progress bar shows."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if "ray/train" in name or name.startswith("ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)


def worker_loop(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: `cfg` is the job's fields plus the `Driver`'s worker
    config under "hardbatch"."""
    import ray.train
    import ray.train.torch

    _quiet_logs()
    cfg = dict(cfg)
    worker_config = cfg.pop("hardbatch")
    job = JobConfig(**cfg)
    device = ray.train.torch.get_device()
    config = dataclasses.replace(job.train_config(), threads=job.threads or 1,
                                 device=str(device))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    # One line per rank, so a multi-node job shows where its ranks landed (Ray Train's own
    # worker-group listing is an INFO line, turned off for the job).
    print(f"hardbatch: rank {rank} of {ctx.get_world_size()} on node "
          f"{ray.util.get_node_ip_address()} ({device})", flush=True)

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / STATE_FILE, weights_only=True)
        log.info("rank %d resumes at epoch %d", rank, resume["epoch"])

    def on_epoch_end(state: dict[str, Any]) -> None:
        hb = state["hardbatch"]
        metrics = {**state["result"]["epochs"][-1], "service_rounds": hb["service_rounds"],
                   "fallback_rounds": hb["fallback_rounds"]}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    fit(config, runtime=Runtime(wrap=ray.train.torch.prepare_model, hardbatch=worker_config,
                                on_epoch_end=on_epoch_end, resume=resume))
