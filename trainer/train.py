"""The built-in training loop, written on the public worker API (`Worker`).

Per batch: score it (forward without grad), keep the examples the loss-share filter picks,
and take one optimizer step on those. With the filter off, and on the steps where the
`Worker`'s cost model finds scoring does not pay, the loop trains on the whole batch.
Either way there is exactly one optimizer step per batch, so LR schedules keep their shape.
The same loop runs in one process (`hardbatch train --local`) and as a Ray Train rank
(`hardbatch.trainer.distributed`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from hardbatch.sampler.filter import per_sample
from hardbatch.trainer.reporter import LossReporter
from hardbatch.trainer.task import Task, TaskArgs, count_correct, iter_batches, load_task
from hardbatch.trainer.worker import Reporter, Worker, WorkerConfig
from tqdm.auto import tqdm

log = logging.getLogger(__name__)
BUILTIN_TASK = "hardbatch.trainer.mnist1d_task:make"
OPTIMIZERS = ("auto", "adamw", "sgd")
SCHEDULES = ("auto", "onecycle", "cosine", "constant")


def _as_in_worker_config(name: str) -> Any:
    """A field with the default and help of `WorkerConfig.<name>` (one place for both)."""
    f = next(f for f in dataclasses.fields(WorkerConfig) if f.name == name)
    return field(default=f.default, metadata=f.metadata)


@dataclass
class TrainConfig:
    """A training run. Field docs double as `hardbatch train --help`."""

    task: str = field(default=BUILTIN_TASK, metadata={
        "help": "Task factory as package.module:function (default: built-in MNIST-1D CNN)."})
    num_samples: int = field(default=50_000, metadata={"help": "Training samples."})
    width: int = field(default=128, metadata={"help": "Model width (channels)."})
    epochs: int = field(default=12, metadata={"help": "Passes over the training data."})
    batch_size: int = field(default=256, metadata={"help": "Samples per batch (scored)."})
    lr: float = field(default=0.01, metadata={
        "help": "Learning rate (the peak of a OneCycle schedule)."})
    weight_decay: float = field(default=0.01, metadata={"help": "Weight decay."})
    optimizer: str = field(default="auto", metadata={
        "help": "adamw, sgd (momentum 0.9, Nesterov), or auto (the task's own, else adamw)."})
    schedule: str = field(default="auto", metadata={
        "help": "LR schedule per step: onecycle, cosine, constant, or auto (the task's own, "
                "else onecycle)."})
    grad_clip: float = field(default=0.0, metadata={
        "help": "Clip the gradient norm to this before each step (0: no clipping)."})
    seed: int = field(default=0, metadata={"help": "Seed for init and data order."})
    filter: bool = _as_in_worker_config("filter")
    cost_model: bool = _as_in_worker_config("cost_model")
    filter_gate: bool = _as_in_worker_config("filter_gate")
    step_curve: bool = _as_in_worker_config("step_curve")
    min_loss_perc: float = _as_in_worker_config("min_loss_perc")
    min_samples_perc: float = _as_in_worker_config("min_samples_perc")
    score_precision: str = _as_in_worker_config("score_precision")
    precision: str = field(default="fp32", metadata={
        "help": "Precision of the training step, forward and backward: fp32, bf16 (autocast), "
                "or fp16 (autocast with a gradient scaler; CUDA only)."})
    evals_per_epoch: int = field(default=1, metadata={
        "help": "Validation passes per epoch (finer time-to-accuracy curves)."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto."})
    threads: int = field(default=0, metadata={"help": "Torch CPU threads (0: torch default)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    task_args: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Extra task arguments, key=value."})

    def __post_init__(self) -> None:
        for name in ("num_samples", "width", "epochs", "batch_size", "evals_per_epoch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda[:N] or auto, got {self.device!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        self.worker_config()  # the filter settings, checked where they are used
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def worker_config(self, **overrides: Any) -> WorkerConfig:
        """The filter settings of this run as a `WorkerConfig` (plus `overrides`)."""
        return WorkerConfig(seed=self.seed, filter=self.filter, cost_model=self.cost_model,
                            filter_gate=self.filter_gate, step_curve=self.step_curve,
                            min_loss_perc=self.min_loss_perc,
                            min_samples_perc=self.min_samples_perc,
                            score_precision=self.score_precision, **overrides)

    def train_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype of the training step, or None for full precision.

        Raises:
            ValueError: fp16 off CUDA (its gradient scaler is a CUDA tool; use bf16 there).
        """
        if self.precision == "fp16" and device.type != "cuda":
            raise ValueError(f"precision fp16 needs a CUDA device, not {device.type}; "
                             "use bf16 (autocast) or fp32")
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


@dataclass
class RunResult:
    """What a run measured. `train_time_s` excludes validation."""

    config: dict[str, Any]
    epochs: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    train_time_s: float = 0.0

    @property
    def final_accuracy(self) -> float:
        return self.evals[-1]["val_accuracy"]

    @property
    def final_val_loss(self) -> float:
        return self.evals[-1]["val_loss"]

    def time_to_accuracy(self, target: float) -> float | None:
        """Training seconds until validation accuracy first reached `target`, else None."""
        return next((e["train_time_s"] for e in self.evals if e["val_accuracy"] >= target), None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(final_accuracy=self.final_accuracy, final_val_loss=self.final_val_loss)
        return d


@dataclass
class Runtime:
    """How the loop meets the world around it. The defaults are one process on one device;
    `hardbatch.trainer.distributed` fills them in for a Ray Train worker.

    Attributes:
        wrap: prepares the model (e.g. moves it and wraps it in DDP).
        hardbatch: the `Worker`'s config (a `Driver`'s `worker_config`); None: a worker on its
            own with the run's filter settings.
        on_epoch_end: called with the loop's state after each epoch (e.g. to checkpoint).
        resume: a state saved by `on_epoch_end` to continue from.
    """

    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    hardbatch: WorkerConfig | Mapping[str, Any] | None = None
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None
    resume: dict[str, Any] | None = None


@torch.no_grad()
def evaluate(task: Task, model: torch.nn.Module, device: torch.device, hb: Worker | None = None,
             batch_size: int = 2048) -> tuple[float, float]:
    """Mean validation loss per sample and accuracy per predicted element (per sample, or per
    position for per-position outputs); each rank scores its share of the validation set.
    Always in full precision: it measures the weights, whatever precision trained them."""
    rank, world = (hb.rank, hb.world_size) if hb else (0, 1)
    model.eval()
    n_val = len(task.val)  # type: ignore[arg-type]
    total_loss, correct, predicted = 0.0, 0, 0
    batches = torch.arange(rank, n_val, world).split(batch_size)
    for _, (x, y, *_) in iter_batches(task.val, batches):
        x, y = x.to(device), y.to(device)
        out = model(x)
        total_loss += float(per_sample(task.loss(out, y)).sum())
        right, made = count_correct(task.logits(out), y)
        correct, predicted = correct + right, predicted + made
    model.train()
    sums = [total_loss, float(correct), float(predicted)]
    loss_sum, correct_sum, predicted_sum = hb.all_reduce(sums) if hb else sums
    return loss_sum / n_val, correct_sum / max(predicted_sum, 1.0)


def train_step(hb: Worker, task: Task, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               ids: torch.Tensor, x: torch.Tensor, y: torch.Tensor, grad_clip: float = 0.0,
               train_dtype: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """One optimizer step on the examples `hb.select` keeps; returns the (detached) loss.

    The scoring forward, the filter, the kept count over ranks, the NaN policy and the loss
    normalization are the `Worker`'s (see `hardbatch.trainer.worker`). `train_dtype` runs the
    training forward under autocast (mixed precision); `scaler` scales the loss for fp16,
    whose small gradients would underflow.
    """
    optimizer.zero_grad(set_to_none=True)
    keep = hb.select(ids, lambda: task.loss(model(x), y))
    with torch.autocast(x.device.type, dtype=train_dtype or torch.float32,
                        enabled=train_dtype is not None):
        losses = task.loss(model(x[keep]), y[keep])
    loss = hb.loss(losses.float())
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


def make_optimizer(config: TrainConfig, task: Task, model: torch.nn.Module, total_steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer and per-step LR schedule `config` names, or the task's own on "auto"."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if config.optimizer == "auto" and task.optimizer is not None:
        optimizer = task.optimizer(params)
    elif config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True,
                                    weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if config.schedule == "auto" and task.scheduler is not None:
        scheduler = task.scheduler(optimizer, total_steps)
    elif config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    elif config.schedule == "constant":
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                        total_steps=total_steps)
    return optimizer, scheduler


def fit(config: TrainConfig, reporter: Reporter | None = None,
        runtime: Runtime | None = None, task: Task | None = None) -> RunResult:
    """Trains `config.task` and returns per-epoch metrics.

    Args:
        config: the run.
        reporter: gets every scored example's loss, once per batch (instead of the loss
            store named by `runtime.hardbatch`).
        runtime: model wrapping, the worker config, checkpoints; one local process by default.
        task: the task, if the caller already built it from `config` (else built here).

    Example:
        >>> r = fit(TrainConfig(num_samples=500, epochs=1, progress=False))  # doctest: +SKIP
    """
    rt = runtime or Runtime()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = config.resolved_device()
    config.train_dtype(device)  # refuses fp16 off CUDA before building anything
    if task is None:
        task = load_task(config.task)(TaskArgs(config.num_samples, config.width, config.seed,
                                               dict(config.task_args)))
    model = rt.wrap(task.model.to(device))
    model.train()
    hb = Worker(rt.hardbatch if rt.hardbatch is not None else config.worker_config(),
                task.train, config.batch_size, reporter=reporter, device=device)
    try:
        return _train(config, task, model, hb, rt, device)
    finally:
        delivery = hb.close()
        if delivery is not None and not delivery.ok:
            log.error("rank %d: loss records not delivered: %s", hb.rank, delivery)


def _train(config: TrainConfig, task: Task, model: torch.nn.Module, hb: Worker, rt: Runtime,
           device: torch.device) -> RunResult:
    total_steps = config.epochs * hb.steps_per_epoch
    optimizer, scheduler = make_optimizer(config, task, model, total_steps)
    train_dtype = config.train_dtype(device)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    result = RunResult(config=asdict(config))
    first_epoch = 0
    if rt.resume is not None:
        getattr(model, "module", model).load_state_dict(rt.resume["model"])
        optimizer.load_state_dict(rt.resume["optimizer"])
        scheduler.load_state_dict(rt.resume["scheduler"])
        hb.load_state_dict(rt.resume["hardbatch"])
        first_epoch = rt.resume["epoch"]
        if scaler is not None and rt.resume.get("scaler"):
            scaler.load_state_dict(rt.resume["scaler"])
        result = RunResult(**rt.resume["result"])
        result.config.setdefault("resumed_at_epochs", []).append(first_epoch)
    # Exactly once across restarts (docs/store.md, "Attempts"): a checkpointing run tags its
    # records with a new attempt number (rank 0 asks the store, every rank gets it), and says
    # which step it starts after: records of older attempts past that step are superseded
    # (all of them when a group restarts before its first checkpoint).
    # Only the store's own reporter keeps attempt and checkpoint markers (a user's may not).
    marks = (hb.reporter if rt.on_epoch_end is not None
             and isinstance(hb.reporter, LossReporter) else None)
    attempt = 0
    if marks is not None:
        mine = marks.new_attempt() if hb.rank == 0 else 0
        attempt = round(hb.all_reduce([float(mine)])[0])
        marks.resume(attempt, hb.step)
    confirmed = hb.step
    for epoch in range(first_epoch, config.epochs):
        epoch_start = result.train_time_s
        batches = hb.batches(epoch)
        n_batches = len(batches)
        eval_at = {round(n_batches * (k + 1) / config.evals_per_epoch)
                   for k in range(config.evals_per_epoch)}
        desc = f"epoch {epoch + 1}/{config.epochs}"
        bar = (tqdm(batches, total=n_batches, desc=desc, leave=False)
               if config.progress and hb.world_size == 1 else batches)
        tick = time.perf_counter()
        for i, (ids, (x, y, *_)) in enumerate(bar, start=1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            train_step(hb, task, model, optimizer, ids, x, y, config.grad_clip, train_dtype,
                       scaler)
            # The schedule follows progress, not steps: a packed round's fewer steps still
            # decay the LR fully.
            hb.schedule_step(scheduler)
            if i in eval_at:
                result.train_time_s += time.perf_counter() - tick
                val_loss, val_acc = evaluate(task, model, device, hb)
                result.evals.append({"epoch": epoch + i / n_batches, "step": hb.step,
                                     "train_time_s": result.train_time_s,
                                     "val_loss": val_loss, "val_accuracy": val_acc})
                if isinstance(bar, tqdm):
                    bar.set_postfix(acc=f"{val_acc:.4f}", kept=f"{hb.kept_fraction:.2f}")
                tick = time.perf_counter()
        result.train_time_s += time.perf_counter() - tick
        last, stats = result.evals[-1], hb.summary()
        result.epochs.append({
            "epoch": epoch + 1, "train_loss": stats["train_loss"],
            "val_loss": last["val_loss"], "val_accuracy": last["val_accuracy"],
            "samp_perc": stats["samp_perc"], "loss_perc": stats["loss_perc"],
            "scored": stats["scored"], "scored_perc": stats["scored_perc"],
            "filter_steps": stats["filter_steps"],
            "cost_switches": stats["cost_switches"], "steps": stats["steps"],
            "trained": stats["trained"], "step_cost": stats["step_cost"],
            "epoch_time_s": result.train_time_s - epoch_start,
            "train_time_s": result.train_time_s,
        })
        if rt.on_epoch_end is not None:
            if marks is not None and hasattr(marks, "flush"):
                # The records up to the checkpoint reach the store before it exists: a worker
                # killed after it must not take them along (bounded: Redis may be down).
                marks.flush(10.0)
            rt.on_epoch_end({
                "model": getattr(model, "module", model).state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1, "result": asdict(result), "hardbatch": hb.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
            })
            if marks is not None and hasattr(marks, "checkpointed"):
                # The checkpoint before this one: by now Ray has registered it, so no restart
                # resumes before it (this one may still be in flight when a worker dies).
                marks.checkpointed(attempt, confirmed)
                confirmed = hb.step
    if marks is not None and hasattr(marks, "checkpointed"):
        marks.checkpointed(attempt, hb.step)  # finished: nothing will train these steps again
    return result
