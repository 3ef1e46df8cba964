"""One training loop for plain and filtered training on one machine.

Per batch: score it (forward without grad), keep the examples the loss-share filter picks,
and take one optimizer step on those. With the filter off the loop trains on the whole batch.
Either way there is exactly one optimizer step per batch, so LR schedules keep their shape.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from hardbatch.sampler.filter import LossShareFilter, per_sample
from hardbatch.trainer.task import Task, TaskArgs, count_correct, iter_batches, load_task
from tqdm.auto import tqdm

BUILTIN_TASK = "hardbatch.trainer.mnist1d_task:make"


class Reporter(Protocol):
    """Where scored losses go (the loss store's reporter); it must not block."""

    def report(self, ids: np.ndarray, losses: np.ndarray, kept: np.ndarray, step: int,
               epoch: int) -> None: ...


@dataclass
class TrainConfig:
    """A training run. Field docs double as `hardbatch train --help`."""

    task: str = field(default=BUILTIN_TASK, metadata={
        "help": "Task factory as package.module:function (default: built-in MNIST-1D CNN)."})
    num_samples: int = field(default=50_000, metadata={"help": "Training samples."})
    width: int = field(default=128, metadata={"help": "Model width (channels)."})
    epochs: int = field(default=12, metadata={"help": "Passes over the training data."})
    batch_size: int = field(default=256, metadata={"help": "Samples per batch (scored)."})
    lr: float = field(default=0.01, metadata={"help": "Peak learning rate of the OneCycle."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    seed: int = field(default=0, metadata={"help": "Seed for init and data order."})
    filter: bool = field(default=True, metadata={
        "help": "Train only on the examples carrying min_loss_perc of each batch's loss."})
    min_loss_perc: float = field(default=0.9, metadata={
        "help": "Share of the batch loss the kept examples must carry."})
    min_samples_perc: float = field(default=0.0, metadata={
        "help": "Least fraction of each batch to keep."})
    score_precision: str = field(default="auto", metadata={
        "help": "Precision of the scoring forward: fp32, bf16, or auto (bf16 where the "
                "hardware runs it fast: AMX/AVX512-BF16 CPUs, bf16 GPUs)."})
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
        for name in ("min_loss_perc", "min_samples_perc"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda[:N] or auto, got {self.device!r}")
        if self.score_precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"score_precision must be fp32, bf16 or auto, got "
                             f"{self.score_precision!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def score_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype of the scoring forward, or None for full precision."""
        if self.score_precision == "fp32":
            return None
        if self.score_precision == "bf16":
            return torch.bfloat16
        fast = (torch.cuda.is_bf16_supported() if device.type == "cuda"
                else torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return torch.bfloat16 if fast else None

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
    epochs: list[dict[str, float]] = field(default_factory=list)
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


def local_plan(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """A seeded shuffle of all sample ids, cut into batches (the last may be short)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(num_samples, generator=gen).split(batch_size))


@dataclass
class Runtime:
    """How the loop meets the world around it. The defaults are one process on one device;
    `hardbatch.trainer.distributed` fills them in for a Ray Train worker.

    Attributes:
        rank: this process's data-parallel rank.
        world_size: number of data-parallel ranks.
        wrap: prepares the model (e.g. moves it and wraps it in DDP).
        all_reduce: sums a list of numbers over all ranks.
        plans: `(epoch, num_samples) -> batches of sample ids` for this rank; every rank must
            get the same number of batches. None: a seeded local shuffle (one rank only).
        steps_per_epoch: `num_samples -> batches per epoch` of `plans` (for the LR schedule).
        on_epoch_end: called with the loop's state after each epoch (e.g. to checkpoint).
        resume: a state saved by `on_epoch_end` to continue from.
    """

    rank: int = 0
    world_size: int = 1
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    all_reduce: Callable[[list[float]], list[float]] = lambda v: v
    plans: Callable[[int, int], Sequence[torch.Tensor]] | None = None
    steps_per_epoch: Callable[[int], int] | None = None
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None
    resume: dict[str, Any] | None = None


@torch.no_grad()
def evaluate(task: Task, model: torch.nn.Module, device: torch.device, rt: Runtime | None = None,
             batch_size: int = 2048) -> tuple[float, float]:
    """Mean validation loss per sample and accuracy per predicted element (per sample, or per
    position for per-position outputs); each rank scores its share of the validation set.
    Always in full precision: it measures the weights, whatever precision trained them."""
    rt = rt or Runtime()
    model.eval()
    n_val = len(task.val)  # type: ignore[arg-type]
    total_loss, correct, predicted = 0.0, 0, 0
    batches = torch.arange(rt.rank, n_val, rt.world_size).split(batch_size)
    for _, (x, y, *_) in iter_batches(task.val, batches):
        x, y = x.to(device), y.to(device)
        out = model(x)
        total_loss += float(per_sample(task.loss(out, y)).sum())
        right, made = count_correct(task.logits(out), y)
        correct, predicted = correct + right, predicted + made
    model.train()
    loss_sum, correct_sum, predicted_sum = rt.all_reduce(
        [total_loss, float(correct), float(predicted)])
    return loss_sum / n_val, correct_sum / max(predicted_sum, 1.0)


def train_step(
    task: Task, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    x: torch.Tensor, y: torch.Tensor, filt: LossShareFilter | None,
    all_reduce: Callable[[list[float]], list[float]] = lambda v: v,
    score_dtype: torch.dtype | None = None, train_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns (per-sample losses of the whole batch, kept mask), on the CPU
    when filtering.

    `all_reduce` sums over the data-parallel ranks. The loss is a sum over kept examples divided
    by the kept count of all ranks, so ranks that keep more examples weigh more, as they should
    (design.md §6). The counts are reduced before the training forward, together with whether
    any rank's filter refused its batch (NaN/inf losses): then every rank raises at the same
    step instead of the others waiting in a collective. `score_dtype` runs the scoring forward
    under autocast: it only ranks examples, so bf16 is precise enough and ~3x cheaper.
    `train_dtype` runs the training forward under autocast too (mixed precision), and
    `scaler` scales the loss for fp16 (whose small gradients would underflow).
    """
    optimizer.zero_grad(set_to_none=True)
    train_autocast = torch.autocast(x.device.type, dtype=train_dtype or torch.float32,
                                    enabled=train_dtype is not None)
    if filt is None:
        count = all_reduce([float(x.shape[0])])[0]
        with train_autocast:
            losses = per_sample(task.loss(model(x), y)).float()
        keep = None
    else:
        autocast = torch.autocast(x.device.type, dtype=score_dtype or torch.float32,
                                  enabled=score_dtype is not None)
        with torch.inference_mode(), autocast:
            scored = per_sample(task.loss(model(x), y)).float()
        # Select on the CPU: one copy instead of a device sync per step of the selection; the
        # copy also leaves inference mode, and the caller wants the losses there anyway.
        scored = scored.cpu() if scored.is_cuda else scored.clone()
        try:
            keep_cpu, refused = filt(scored), None
        except ValueError as e:
            keep_cpu, refused = torch.zeros(0, dtype=torch.long), e
        count, n_refused = all_reduce([float(len(keep_cpu)), float(refused is not None)])
        if n_refused:
            raise refused or ValueError(
                f"the loss filter refused the batch on {int(n_refused)} other rank(s)")
        keep = keep_cpu.to(x.device)
        with train_autocast:
            losses = per_sample(task.loss(model(x[keep]), y[keep])).float()
    # DDP averages gradients over ranks; scaling by world size turns that into a global sum.
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    loss = losses.sum() * (world / count)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    if keep is None:
        return losses.detach(), torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    mask = torch.zeros(x.shape[0], dtype=torch.bool)
    mask[keep_cpu] = True
    return scored, mask


def fit(config: TrainConfig, reporter: Reporter | None = None,
        runtime: Runtime | None = None, task: Task | None = None) -> RunResult:
    """Trains `config.task` and returns per-epoch metrics.

    Args:
        config: the run.
        reporter: gets every scored example's loss, once per batch.
        runtime: rank, collectives, plans and checkpoints; one local process by default.
        task: the task, if the caller already built it from `config` (else built here).

    Example:
        >>> r = fit(TrainConfig(num_samples=500, epochs=1, progress=False))  # doctest: +SKIP
    """
    rt = runtime or Runtime()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = config.resolved_device()
    train_dtype = config.train_dtype(device)  # refuses fp16 off CUDA before building anything
    if task is None:
        task = load_task(config.task)(TaskArgs(config.num_samples, config.width, config.seed,
                                               dict(config.task_args)))
    n = task.num_samples
    model = rt.wrap(task.model.to(device))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    steps_per_epoch = (rt.steps_per_epoch(n) if rt.steps_per_epoch
                       else math.ceil(n / config.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch)
    filt = LossShareFilter(config.min_loss_perc, config.min_samples_perc) if config.filter \
        else None
    score_dtype = config.score_dtype(device)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    plan_fn = rt.plans or (lambda ep, n: local_plan(n, config.batch_size, config.seed, ep))

    result = RunResult(config=asdict(config))
    step, first_epoch = 0, 0
    if rt.resume is not None:
        unwrapped = getattr(model, "module", model)
        unwrapped.load_state_dict(rt.resume["model"])
        optimizer.load_state_dict(rt.resume["optimizer"])
        scheduler.load_state_dict(rt.resume["scheduler"])
        step, first_epoch = rt.resume["step"], rt.resume["epoch"]
        if scaler is not None and rt.resume.get("scaler"):
            scaler.load_state_dict(rt.resume["scaler"])
        result = RunResult(**rt.resume["result"])
        result.config.setdefault("resumed_at_epochs", []).append(first_epoch)
    for epoch in range(first_epoch, config.epochs):
        epoch_start = result.train_time_s
        scored_sum, scored_n, kept_n = 0.0, 0, 0
        if filt is not None:
            filt.reset()
        id_batches = plan_fn(epoch, n)
        eval_at = {round(len(id_batches) * (k + 1) / config.evals_per_epoch)
                   for k in range(config.evals_per_epoch)}
        batches: Iterable = iter_batches(task.train, id_batches)
        desc = f"epoch {epoch + 1}/{config.epochs}"
        bar = (tqdm(batches, total=len(id_batches), desc=desc, leave=False)
               if config.progress and rt.world_size == 1 else batches)
        tick = time.perf_counter()
        for i, (ids, (x, y, *_)) in enumerate(bar, start=1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            losses, kept = train_step(task, model, optimizer, x, y, filt, rt.all_reduce,
                                      score_dtype=score_dtype, train_dtype=train_dtype,
                                      scaler=scaler)
            step += 1
            if step < scheduler.total_steps:  # a plan longer than promised must not crash it
                scheduler.step()
            losses_cpu = losses.float().cpu()
            scored_sum += float(losses_cpu.sum())
            scored_n += len(ids)
            kept_n += int(kept.sum())
            if reporter is not None:
                reporter.report(ids.numpy(), losses_cpu.numpy(), kept.cpu().numpy(), step, epoch)
            if i in eval_at:
                result.train_time_s += time.perf_counter() - tick
                val_loss, val_acc = evaluate(task, model, device, rt)
                result.evals.append({"epoch": epoch + i / len(id_batches), "step": step,
                                     "train_time_s": result.train_time_s,
                                     "val_loss": val_loss, "val_accuracy": val_acc})
                if isinstance(bar, tqdm):
                    bar.set_postfix(acc=f"{val_acc:.4f}", kept=f"{kept_n / scored_n:.2f}")
                tick = time.perf_counter()
        result.train_time_s += time.perf_counter() - tick
        last = result.evals[-1]
        share_sum = float(np.sum(filt.loss_perc)) if filt else float(len(id_batches))
        loss_sum, seen, kept_sum, share_sum, steps = rt.all_reduce(
            [scored_sum, float(scored_n), float(kept_n), share_sum, float(len(id_batches))])
        result.epochs.append({
            "epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
            "val_loss": last["val_loss"], "val_accuracy": last["val_accuracy"],
            "samp_perc": kept_sum / max(seen, 1),
            "loss_perc": share_sum / max(steps, 1),
            "epoch_time_s": result.train_time_s - epoch_start,
            "train_time_s": result.train_time_s,
        })
        if rt.on_epoch_end is not None:
            rt.on_epoch_end({
                "model": getattr(model, "module", model).state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "step": step, "epoch": epoch + 1, "result": asdict(result),
            })
    return result
