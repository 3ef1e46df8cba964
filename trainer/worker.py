"""hardbatch inside a training loop: plan-driven batches, selection, the normalized loss.

One `Worker` per training process. It finds its rank and world size in `torch.distributed`
(Ray Train sets that up before `train_loop_per_worker` runs), else it is one process. Per step:

    for ids, (x, y) in hb.batches(epoch):
        keep = hb.select(ids, lambda: loss_fn(model(x), y))   # scoring forward, no grad
        loss = hb.loss(loss_fn(model(x[keep]), y[keep]))     # normalized over all ranks
        loss.backward(); optimizer.step()

`select` and `loss` each do one thing the loop cannot do alone: `select` all-reduces the kept
count (and whether a rank's filter refused its batch) before anyone's training forward, so
ranks that keep more weigh more (design.md §6) and a NaN raises on every rank at the same step
instead of leaving the others in a collective; `loss` divides by that global count, applies
importance weights when plans carry them, and reports every scored loss to the store.

The filter gate (`filter_gate`, on by default; `sampler/cost_model.KeptGate`) runs the filter
only where it pays by the kept share: training starts with full steps (`select` returns
`slice(None)` and scores nothing; `loss` reports the training forward's losses, checks them
for NaN/inf, and counts what the filter would keep), and eight times a round every rank
decides alike whether the next stretch filters. From losses alone: runs stay reproducible.

With `cost_model` on (off by default) `select` also times the steps (from one call to the next)
and runs some of them in full, without the scoring forward, where the filter would keep so
much of the batch that scoring costs more than it saves (`hardbatch.trainer.step_costs`); the
loop does not change. On a full step `loss` reports the training forward's losses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from hardbatch.sampler.cost_model import KeptGate, Mode, StepCurve
from hardbatch.sampler.filter import Selection, per_sample, select
from hardbatch.trainer.plan_source import Round, RoundPlans
from hardbatch.trainer.step_costs import StepCosts
from hardbatch.trainer.task import IdCollate, IdDataset
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

log = logging.getLogger(__name__)
SCORE_PRECISIONS = ("auto", "fp32", "bf16")


class Reporter(Protocol):
    """Where scored losses go (the loss store's reporter); it must not block."""

    def report(self, ids: np.ndarray, losses: np.ndarray, kept: np.ndarray, step: int,
               epoch: int) -> None: ...


@dataclass
class WorkerConfig:
    """What a `Worker` needs: where plans and losses go, and how to filter.

    A `Driver` makes one for its run (`driver.worker_config`, a dict for Ray's
    `train_loop_config`); the defaults are a worker on its own: a seeded shuffle, nothing
    streamed, the filter on.
    """

    run: str = field(default="", metadata={"help": "Run name at the store and the service."})
    service: str = field(default="", metadata={
        "help": "Sampler service URL; empty: a seeded local shuffle."})
    redis: str = field(default="", metadata={
        "help": "Redis URL of the loss store; empty: losses are not streamed."})
    plan_fraction: float = field(default=1.0, metadata={
        "help": "Share of the dataset each round (epoch) covers over all ranks."})
    seed: int = field(default=0, metadata={
        "help": "Seed of the local shuffle (and, through a Driver, of the service's plans)."})
    filter: bool = field(default=True, metadata={
        "help": "Train only on the examples carrying min_loss_perc of each batch's loss."})
    # Off by default: on the MNIST-1D frontier it reached plain's best in 28.4 s against the
    # filter-always default's 17.7 s (325e7e4; 35.0 vs 15.8 s before it projected the kept
    # fraction's trend): a full step costs about what a filtered one does early on but learns
    # less (README, "frontier"). And its steps depend on measured times, not only the seed.
    cost_model: bool = field(default=False, metadata={
        "help": "Turn the filter off on the steps where its scoring forward does not pay "
                "(early epochs, flat losses: it keeps most of the batch) and back on when it "
                "does, from measured step times; off: the filter runs every step (a "
                "deterministic schedule)."})
    filter_gate: bool = field(default=True, metadata={
        "help": "Filter only where it pays, judged from the kept share alone (deterministic): "
                "eight times a round, the filter runs if the share it keeps (or would keep, "
                "from a full step's losses) is below 2/3 or falls fast enough to get there "
                "within a round; else full batches, unscored (flat losses). Training starts "
                "with full steps. Off: the filter on every step. Ignored with cost_model."})
    min_loss_perc: float = field(default=0.9, metadata={
        "help": "Share of the batch loss the kept examples must carry."})
    min_samples_perc: float = field(default=0.0, metadata={
        "help": "Least fraction of each batch to keep."})
    nonfinite: str = field(default="raise", metadata={
        "help": "NaN/inf scored losses: raise (on every rank at the same step) or keep them."})
    # Off by default: on the 2-core development VM 11 of 75 MNIST-1D runs read a flat curve
    # from a round 0 the machine ran slower and lost the filter for good (README, frontier).
    step_curve: bool = field(default=False, metadata={
        "help": "Measure a step's cost against its sample count over the first round (time = "
                "a + b n) and from then on filter only where a shrunk step is cheaper than a "
                "full one by it (never where a step costs the same at any size: a GPU's small "
                "models, a small MLP). Timed, and read the machine's load on a busy 2-core "
                "VM: off, the kept-share gate alone decides. The curve is measured either "
                "way (summary()['step_cost'])."})
    score_precision: str = field(default="auto", metadata={
        "help": "Precision of the scoring forward: fp32, bf16, or auto (bf16 on GPUs that run "
                "it; on a CPU, bf16 only if it scored the first batch at least 20% faster "
                "than the loop's own precision: pin fp32 or bf16 for bit-equal reruns)."})
    importance_weights: bool = field(default=False, metadata={
        "help": "Weigh each kept loss by its plan's importance weight (plans with beta > 0)."})

    def __post_init__(self) -> None:
        select(torch.ones(1), self.min_loss_perc, self.min_samples_perc)  # its own checks
        if not 0.0 < self.plan_fraction <= 1.0:
            raise ValueError(f"plan_fraction must be in (0, 1], got {self.plan_fraction}")
        if self.nonfinite not in ("raise", "keep"):
            raise ValueError(f"nonfinite must be raise or keep, got {self.nonfinite!r}")
        if not isinstance(self.cost_model, bool):
            raise ValueError(f"cost_model must be true or false, got {self.cost_model!r}")
        if self.score_precision not in SCORE_PRECISIONS:
            raise ValueError(f"score_precision must be fp32, bf16 or auto, got "
                             f"{self.score_precision!r}")

    @classmethod
    def of(cls, config: WorkerConfig | Mapping[str, Any] | None) -> WorkerConfig:
        """`config` itself, one made from a dict (unknown keys refused), or the defaults."""
        if config is None:
            return cls()
        if isinstance(config, WorkerConfig):
            return config
        unknown = set(config) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown worker config keys: {sorted(unknown)}")
        return cls(**config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# auto on a CPU: bf16 autocast must score this much faster to be used. It pays for large
# matmuls and costs for small models (measured on an AMX Xeon, one thread, 256 samples: a
# width-128 CNN 24 -> 15 ms, a width-32 CNN 2.5 -> 2.8 ms, a width-32 GRU 3.5 -> 9.1 ms), so
# CPU support alone does not decide it; the margin keeps the choice stable from run to run.
PROBE_GAIN = 0.8
PROBE_REPS = 3


def score_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype of the scoring forward (float32: autocast off), or None to leave
    precision as the caller has it (auto on a CPU until `Worker` timed both)."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    fast = device_type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if fast else None


def local_plan(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """A seeded shuffle of all sample ids, cut into batches (the last may be short)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(num_samples, generator=gen).split(batch_size))


class PlanSampler(DistributedSampler):
    """The sample ids of this rank's round, in plan order: a `DistributedSampler`, so Ray's
    `prepare_data_loader` keeps it (it replaces any other sampler), and `set_epoch` picks the
    round as with any distributed sampler. The round is fetched once per epoch, by `len()` or
    by iteration, whichever comes first: a packed round's length is known only then."""

    def __init__(self, dataset: Dataset, rounds: Callable[[int], Round], batch_size: int,
                 rank: int, world_size: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        self._rounds, self._batch_size = rounds, batch_size
        self.current: Round | None = None
        self.round_epoch = -1  # the epoch of `current`

    def round(self) -> Round:
        """This epoch's round (fetched on the first call of the epoch)."""
        if self.current is None or self.round_epoch != self.epoch:
            self.current, self.round_epoch = self._rounds(self.epoch), self.epoch
        return self.current

    def __len__(self) -> int:
        rnd = self.round()
        # Every batch but a local plan's last is full: count its ids, not its slots.
        return (len(rnd) - 1) * self._batch_size + len(rnd[-1]) if len(rnd) else 0

    def __iter__(self) -> Iterator[int]:
        for batch in self.round():
            yield from batch.tolist()


class Worker:
    """hardbatch in your training loop: plan-driven batches, selection, the normalized loss.

    Args:
        config: a `Driver`'s `worker_config` (a dict), a `WorkerConfig`, or None for a worker
            on its own (local shuffle, filter on, nothing streamed).
        dataset: the training set (map-style; its index is the sample id). A
            `TensorDataset` is gathered a batch at a time.
        batch_size: samples per batch (scored; the filter keeps a part).
        reporter: where scored losses go instead of the config's loss store (`.report(ids,
            losses, kept, step, epoch)`); it is not closed by `close()`.
        device: where the scoring forward runs, for its autocast (default: Ray Train's device,
            else CUDA when present, else CPU).
        **loader_kwargs: more `DataLoader` arguments (`num_workers`, `pin_memory`,
            `collate_fn` for the items, ...).

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,)))
        >>> model = torch.nn.Linear(3, 2)
        >>> loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
        >>> with Worker(None, ds, batch_size=16) as hb:
        ...     for ids, (x, y) in hb.batches(epoch=0):
        ...         keep = hb.select(ids, lambda: loss_fn(model(x), y))
        ...         hb.loss(loss_fn(model(x[keep]), y[keep])).backward()
        >>> hb.step
        4
    """

    def __init__(self, config: WorkerConfig | Mapping[str, Any] | None, dataset: Dataset,
                 batch_size: int, *, reporter: Reporter | None = None,
                 device: torch.device | str | None = None, **loader_kwargs: Any) -> None:
        self.config = cfg = WorkerConfig.of(config)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        dist = torch.distributed
        self.rank, self.world_size = ((dist.get_rank(), dist.get_world_size())
                                      if dist.is_available() and dist.is_initialized() else (0, 1))
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else _default_device()
        self._score_dtype = score_dtype(cfg.score_precision, self.device.type)
        self._probe_scoring = cfg.score_precision == "auto" and self.device.type == "cpu"
        self.step, self.service_rounds_before, self.fallback_rounds_before = 0, 0, 0

        from hardbatch.services.client import SamplerClient
        from hardbatch.trainer.reporter import LossReporter

        token = _token()
        self._client = SamplerClient(cfg.service, token=token) if cfg.service else None
        if self._client is not None and logging.getLogger("httpx").level == logging.NOTSET:
            # httpx logs every request at INFO: one line per plan in the user's training log.
            logging.getLogger("httpx").setLevel(logging.WARNING)
        self._own_reporter = reporter is None and bool(cfg.redis and cfg.run)
        self.reporter: Reporter | None = (LossReporter(cfg.redis, cfg.run, self.rank)
                                          if self._own_reporter else reporter)
        # Only losses that reach the store can be waited for: a user's own reporter may not.
        self._send_now = (self.reporter.send_now if isinstance(self.reporter, LossReporter)
                          else None)
        self._plans = RoundPlans(self._client, cfg.run, self.rank, self.world_size, batch_size,
                                 cfg.plan_fraction, cfg.seed, with_weights=cfg.importance_weights,
                                 after_losses=self._send_now is not None)
        if self._client is None and self.world_size == 1:
            # One process, no service: every sample once per epoch, the last batch short.
            steps = math.ceil(self.num_samples / batch_size)
            rounds: Callable[[int], Round] = lambda e: Round(  # noqa: E731
                local_plan(self.num_samples, batch_size, cfg.seed, e))
        else:
            steps = self._plans.steps(self.num_samples)
            rounds = self._service_round
        self.steps_per_epoch = steps
        self._done = 0  # steps trained in the round `_done_in`
        self._done_in: Round | None = None
        self.sampler = PlanSampler(dataset, rounds, batch_size, self.rank, self.world_size)
        collate = IdCollate(loader_kwargs.pop("collate_fn", None))
        self.loader = DataLoader(IdDataset(dataset), batch_size=batch_size, sampler=self.sampler,
                                 collate_fn=collate, **loader_kwargs)
        self._pending: _Selection | None = None
        self._bad_full = False  # the last full step's losses were not all finite
        # scored loss sum, scored, kept, loss-share sum, steps, filtered steps
        self._stats = np.zeros(6)
        # The cost model turns the filter off on the steps where it does not pay (with the
        # filter off there is nothing to decide).
        self._costs = StepCosts() if cfg.filter and cfg.cost_model else None
        self._gate = (KeptGate() if cfg.filter and cfg.filter_gate and self._costs is None
                      else None)
        # The gate: the stretch of steps in progress (epoch, window), its kept (or would-be
        # kept) and scored counts on this rank, the last stretch's share over all ranks,
        # whether this stretch filters (training starts with full steps), switches so far.
        self._round_pos = (0, -1)  # (this batch's place in its round, the round)
        self._gate_counts = np.zeros(2)
        self._gate_shares: list[float] = []  # of the last stretches, oldest first
        self._gate_filters = self._gate is None
        self._gate_switches = 0
        self._switches_before = 0  # the cost model's switches at the last summary
        # The step-cost curve, over this worker's first round: each step from one select to
        # the next, less its scoring, against the samples it trained.
        self.curve = StepCurve()
        self._tick: tuple[float, int, float, Round | None] | None = None  # start, n, score s
        self._curve_round: Round | None = None
        self._shrink_below: float | None = None  # the curve's verdict, once round 0 is done

    # -- batches -----------------------------------------------------------------------------

    def _service_round(self, epoch: int) -> Round:
        # The service composes this round once it has all of the last one's losses: send
        # them now rather than after the reporter's linger.
        if self._send_now is not None:
            self._send_now()
        rnd = self._plans(epoch, self.num_samples)
        if self.world_size > 1:
            # Every rank must train as many batches: one on its local fallback has a full
            # round where the service's is packed (one collective per round).
            rnd = rnd.truncated(int(self._reduce([float(len(rnd))], min_=True)[0]))
        return rnd

    @property
    def progress_steps(self) -> float:
        """Where training is in full-epoch steps: `epoch * steps_per_epoch` plus the share of
        this round trained, times `steps_per_epoch`. It counts one per step when every round is
        a full epoch's, and faster when a packed round trains fewer, full batches: step an LR
        schedule built for `epochs * steps_per_epoch` steps to it (`schedule_step`) and it
        decays fully whatever the rounds hold."""
        rnd, epoch = self.sampler.current, self.sampler.round_epoch
        if rnd is None:
            return self.steps_per_epoch * self.epoch
        done = self._done if self._done_in is rnd else 0
        return self.steps_per_epoch * (epoch + min(done / max(len(rnd), 1), 1.0))

    def progress(self, epochs: int) -> float:
        """Share of a run of `epochs` epochs trained so far, in [0, 1]: for a schedule of your
        own as a function of progress (`lr = peak * f(hb.progress(EPOCHS))`)."""
        return min(1.0, self.progress_steps / max(epochs * self.steps_per_epoch, 1))

    def schedule_step(self, scheduler: Any) -> None:
        """Steps `scheduler` (one built for `epochs * steps_per_epoch` steps, e.g.
        `OneCycleLR(total_steps=EPOCHS * hb.steps_per_epoch)`) up to `progress_steps`: call it
        where the loop called `scheduler.step()`. Once per step while every round is full;
        more where rounds are packed, so the schedule ends where it would have. A `OneCycleLR`
        stops at its last step rather than raise."""
        target = math.floor(self.progress_steps + 1e-9)
        total = getattr(scheduler, "total_steps", None)
        if total is not None:
            target = min(target, int(total) - 1)
        while scheduler.last_epoch < target:
            scheduler.step()

    @property
    def epoch(self) -> int:
        return int(self.sampler.epoch)

    def batches(self, epoch: int) -> DataLoader:
        """This rank's batches of round `epoch`, as `(ids, batch)`: `hb.loader` after
        `set_epoch(epoch)`. Every rank gets the same number: `steps_per_epoch`, or fewer,
        full ones in a packed round (`len(hb.loader)` says; step schedules with
        `schedule_step`).

        To use Ray's `prepare_data_loader` (device transfer), pass it `hb.loader` and call
        `loader.sampler.set_epoch(epoch)` each epoch: its sampler is a `DistributedSampler`,
        so Ray keeps it.
        """
        self.sampler.set_epoch(epoch)
        return self.loader

    # -- the step ------------------------------------------------------------------------------

    def select(self, ids: torch.Tensor, score: Callable[[], torch.Tensor] | torch.Tensor
               ) -> torch.Tensor | slice:
        """Scores the batch and picks the examples to train on; a collective over ranks.

        Args:
            ids: the batch's sample ids (from `batches`).
            score: a function running the forward that returns per-sample losses (called
                without grad and, where fast, under bf16 autocast), or those losses.

        Returns:
            Indices into the batch's first dimension, on the losses' device, or `slice(None)`,
            the whole batch, with nothing scored here: with the filter off, and on the steps
            the cost model finds a full step cheaper (`WorkerConfig.cost_model`).

        Raises:
            ValueError: a NaN/inf loss on any rank (with `nonfinite="raise"`): every rank
                raises at the same step.
        """
        n = len(ids)
        w = self._weights(ids)
        costs = self._costs
        measuring = self._measuring()
        if (costs is not None or measuring) and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the last step's kernels end in its time
        step_start = time.perf_counter()
        self._close_step(step_start)
        if self._gate is not None:
            self._gate_step()
        mode = (costs.begin(self.epoch) if costs is not None
                else Mode.FILTER if self.config.filter and self._gate_filters else Mode.FULL)
        measured = costs.pending() if costs is not None else []
        # A NaN/inf loss of the last full step (its losses came after its select) stops every
        # rank here, at the same step: one rank raising alone would leave the others waiting.
        bad_full, self._bad_full = self._bad_full, False
        if mode is Mode.FULL:
            count, n_bad, *sums = self._reduce([float(n) if w is None else float(w.sum()),
                                                float(bad_full), *measured])
            if n_bad:
                raise _nonfinite_full(self.step, n_bad)
            self._settle(sums)
            self._pending = _Selection(ids, None, None, count, 1.0)
            self._open_step(step_start, n, 0.0, measuring)
            return slice(None)
        if callable(score) and self._probe_scoring:
            self._probe_scoring = False
            self._score_dtype = self._probe(score)
            measuring = False  # the probe's time is not this step's cost
            if costs is not None:
                costs.interrupt()
        tick = time.perf_counter()
        if callable(score):
            with torch.inference_mode(), self._score_autocast(self._score_dtype):
                scored = per_sample(score()).float()
        else:
            scored = per_sample(score.detach()).float()
        # Select on the CPU: one copy instead of a device sync per step of the selection; the
        # copy also leaves inference mode, and the reporter wants the losses there anyway.
        device = scored.device
        scored = scored.cpu() if scored.device.type != "cpu" else scored.clone()
        score_s = time.perf_counter() - tick
        if costs is not None:
            costs.scored(score_s)
        if len(scored) != n:
            raise ValueError(f"score gave {len(scored)} losses for a batch of {n} ids")
        try:
            sel, keep, refused = *self._filter(scored, w), None
        except ValueError as e:
            sel, keep, refused = None, torch.zeros(0, dtype=torch.long), e
        kept_weight = float(len(keep)) if w is None else float(w[keep].sum())
        count, n_refused, n_bad, *sums = self._reduce([kept_weight, float(refused is not None),
                                                       float(bad_full), *measured])
        if n_bad:
            raise _nonfinite_full(self.step, n_bad)
        if n_refused:
            raise refused or ValueError(
                f"the loss filter refused the batch on {int(n_refused)} other rank(s)")
        assert sel is not None
        if costs is not None:
            costs.kept(len(keep) / n)
        if self._gate is not None:
            self._gate_counts += (len(keep), n)
        self._settle(sums)
        self._pending = _Selection(ids, scored, keep, count, sel.loss_perc)
        self._open_step(step_start, len(keep), score_s, measuring)
        return keep.to(device)

    # Steps of the first round that the curve skips: first calls allocate and pick kernels.
    CURVE_WARMUP = 3
    CURVE_STEPS = 512

    def _measuring(self) -> bool:
        rnd = self.sampler.current
        if self._curve_round is None:
            self._curve_round = rnd
        return rnd is self._curve_round and self.curve.steps < self.CURVE_STEPS

    def _open_step(self, start: float, n: int, score_s: float, measuring: bool) -> None:
        self._tick = (start, n, score_s, self.sampler.current) if measuring else None

    def _close_step(self, now: float) -> None:
        """The step begun at the last `select` ends here: add it to the curve (when it was in
        the first round, as this one is, and past the warm-up)."""
        tick, self._tick = self._tick, None
        if tick is None or tick[3] is not self.sampler.current or self._done <= self.CURVE_WARMUP:
            return
        start, n, score_s, _ = tick
        self.curve.add(n, max(now - start - score_s, 0.0), score_s)

    def _score_autocast(self, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
        # fp32 turns off an autocast of the caller's; None leaves it as it is.
        return (contextlib.nullcontext() if dtype is None else torch.autocast(
            self.device.type, dtype=dtype, enabled=dtype != torch.float32))

    def _probe(self, score: Callable[[], torch.Tensor]) -> torch.dtype | None:
        """auto on a CPU: times the scoring forward of the first batch in the loop's own
        precision and under bf16 autocast (summed over ranks, so every rank picks alike); bf16
        only if it is `PROBE_GAIN` of the other or less."""
        seconds = []
        for dtype in (None, torch.bfloat16):
            with torch.inference_mode(), self._score_autocast(dtype):
                score()  # warm-up: first-call allocations and kernel choice
                tick = time.perf_counter()
                for _ in range(PROBE_REPS):
                    score()
                seconds.append(time.perf_counter() - tick)
        own_s, bf16_s = self._reduce(seconds)
        chosen = torch.bfloat16 if bf16_s <= PROBE_GAIN * own_s else None
        log.info("scoring forward: %.2f ms as the loop runs, %.2f ms under bf16 autocast: %s",
                 own_s / PROBE_REPS / self.world_size * 1e3,
                 bf16_s / PROBE_REPS / self.world_size * 1e3,
                 "bf16" if chosen else "the loop's precision")
        return chosen

    def _gate_step(self) -> None:
        """Places this batch in its round; at the first batch of a stretch, decides from the
        last stretch whether this one filters: one collective per stretch, where every rank
        is at the same batch."""
        gate = self._gate
        assert gate is not None
        last, last_round = self._round_pos
        pos = last + 1 if last_round == self.epoch else 0
        self._round_pos = (pos, self.epoch)
        length = max(len(self.sampler.round()), 1)
        stretch = gate.windows * pos // length
        if pos and stretch == gate.windows * (pos - 1) // length:
            return
        curve_due = (self.config.step_curve and self._shrink_below is None
                     and self.sampler.current is not self._curve_round)
        kept, scored, *curve = self._reduce(self._gate_counts.tolist()
                                            + (self.curve.estimate() if curve_due else []))
        if curve_due:
            # The first round is measured: from here the filter runs only below the kept
            # share where a shrunk step is cheaper than a full one by its curve (0 where
            # shrinking never pays), and where the gate says so.
            verdict = StepCurve.verdict(curve, self.batch_size)
            pays = verdict["shrink_pays_below"]
            self._shrink_below = 1.0 if pays is None else pays
            log.info("step cost curve of round 0: %s; the filter runs below a kept share of "
                     "%.2f", verdict, min(self._shrink_below, gate.max_kept))
        if scored > 0:
            self._gate_shares = [*self._gate_shares[-gate.windows:], kept / scored]
            filters = gate.filters(self._gate_shares) and (
                self._shrink_below is None
                or gate.projected(self._gate_shares) < self._shrink_below)
            if filters != self._gate_filters:
                self._gate_switches += 1
                log.info("round %d, batch %d: the filter turns %s (it kept %.0f%%, %.0f%% "
                         "projected a round ahead)", self.epoch, pos, "on" if filters else "off",
                         100 * self._gate_shares[-1], 100 * gate.projected(self._gate_shares))
            self._gate_filters = filters
        self._gate_counts[:] = 0

    def _filter(self, scored: torch.Tensor, w: torch.Tensor | None
                ) -> tuple[Selection, torch.Tensor]:
        """The loss filter's selection of a batch's CPU losses, and the kept indices that
        carry weight. Raises ValueError where the filter refuses the batch (NaN/inf)."""
        # The filter ranks by the loss each example would add to the step, w * l: a weight-0
        # example (a suspected label error: scored and reported, never trained on) carries no
        # share, so the filter keeps what the step will actually train on.
        ranked = scored if w is None else scored * w
        sel = select(ranked, self.config.min_loss_perc, self.config.min_samples_perc,
                     nonfinite=self.config.nonfinite)  # type: ignore[arg-type]
        keep = sel.indices
        return sel, keep if w is None else keep[w[keep] > 0]

    def _settle(self, sums: list[float]) -> None:
        if self._costs is not None:
            self._costs.settle(self.step, sums, self.world_size)

    def loss(self, losses: torch.Tensor) -> torch.Tensor:
        """The loss to call `backward()` on: `sum(w * kept losses) * world / sum(w)` over
        the kept examples of all ranks, and this step's scored losses go to the loss store.

        DDP averages gradients over ranks; the `* world` turns that into the sum over all kept
        examples, divided by their total weight over all ranks (their count when every `w` is
        1). `w` is each example's importance weight when the plans carry them, else 1.

        Args:
            losses: per-sample losses (`reduction="none"`) of the examples `select` kept.
        """
        sel, self._pending = self._pending, None
        if sel is None:
            raise RuntimeError("call select() before loss(), once per batch")
        losses = per_sample(losses)
        ids_kept = sel.ids if sel.keep is None else sel.ids[sel.keep.to(sel.ids.device)]
        if len(losses) != len(ids_kept):
            raise ValueError(f"loss() got {len(losses)} losses for {len(ids_kept)} kept examples")
        w = self._weights(ids_kept)
        total = (losses * w.to(losses.device)).sum() if w is not None else losses.sum()
        self.step += 1
        if self._done_in is not self.sampler.current:
            self._done, self._done_in = 0, self.sampler.current
        self._done += 1
        scored = sel.scored if sel.scored is not None else losses.detach().float().cpu()
        kept = torch.ones(len(scored), dtype=torch.bool)
        if sel.keep is not None:
            kept = torch.zeros(len(scored), dtype=torch.bool)
            kept[sel.keep] = True
        elif self.config.nonfinite == "raise" and not bool(torch.isfinite(scored).all()):
            # A full step's losses were not scored before it: check them now. One process
            # raises before backward; several ranks raise together at the next select.
            if self.world_size == 1:
                raise _nonfinite_full(self.step, 1)
            self._bad_full = True
        elif self._costs is not None or self._gate is not None:
            # A full step: what the filter would have kept, from this forward's losses, so
            # the cost model (or the gate) sees when filtering pays again.
            with contextlib.suppress(ValueError):  # NaN/inf: nothing to say this step
                would = len(self._filter(scored, w)[1])
                if self._costs is not None:
                    self._costs.kept(would / max(len(scored), 1))
                else:
                    self._gate_counts += (would, len(scored))
        self._stats += (float(scored.sum()), len(scored), int(kept.sum()), sel.loss_share, 1,
                        float(sel.keep is not None))
        if self.reporter is not None:
            self.reporter.report(sel.ids.cpu().numpy(), scored.numpy(), kept.numpy(), self.step,
                                 self.epoch)
        # All kept weights zero on every rank (a batch of suspects only): no gradient.
        return total * (self.world_size / sel.count) if sel.count > 0 else total * 0.0

    def _weights(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The plan's importance weights of `ids` (CPU), or None when not applied."""
        rnd = self.sampler.current
        if not self.config.importance_weights or rnd is None:
            return None
        w = rnd.weights_of(ids)
        return None if w is None else w.float()

    # -- numbers -------------------------------------------------------------------------------

    def all_reduce(self, values: list[float]) -> list[float]:
        """Sums `values` over all ranks (a collective when there are several).

        Call it between steps only (e.g. in an evaluation): the time until the next `select`
        is then not taken for a training step's.
        """
        if self._costs is not None:
            self._costs.interrupt()
        self._tick = None  # an evaluation is no step's cost
        return self._reduce(values)

    def _reduce(self, values: list[float], min_: bool = False) -> list[float]:
        if self.world_size == 1:
            return values
        dist = torch.distributed
        # NCCL reduces only CUDA tensors, gloo CPU ones.
        on = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
        t = torch.tensor(values, dtype=torch.float64, device=on)
        dist.all_reduce(t, op=dist.ReduceOp.MIN if min_ else dist.ReduceOp.SUM)
        return t.tolist()

    def summary(self) -> dict[str, Any]:
        """Since the last summary, over all ranks (a collective): mean scored loss
        (`train_loss`), kept fraction (`samp_perc`; 1 on a full step), examples trained
        (`trained`), the examples scored (`scored`, counted here, apart from the loss store:
        what a check of the store compares with), the step-cost curve of the first round
        (`step_cost`: `a + b n` seconds a step of n samples, see `StepCurve`), the share of the
        batches' slots scored (`scored_perc`: below 1 with an adaptive plan size), mean loss
        share kept (`loss_perc`), `steps` per rank, the share of them the filter ran on
        (`filter_steps`), the cost model's switches of mode (`cost_switches`) and, once it
        measured both modes, its `predicted_ratio` (a filtered step's cost over a full one)."""
        loss_sum, scored, kept, share_sum, steps, filtered, *curve = self.all_reduce(
            self._stats.tolist() + self.curve.estimate())
        self._stats[:] = 0
        out: dict[str, Any] = {
            "train_loss": loss_sum / max(scored, 1), "samp_perc": kept / max(scored, 1),
            "trained": kept, "scored": scored,
            "step_cost": {**StepCurve.verdict(curve, self.batch_size),
                          "steps": float(self.curve.steps)},
            "scored_perc": scored / max(steps * self.batch_size, 1),
            "loss_perc": share_sum / max(steps, 1), "steps": steps / self.world_size,
            "filter_steps": filtered / max(steps, 1), "cost_switches": 0.0}
        if self._costs is not None or self._gate is not None:
            switches = (len(self._costs.model.decisions) if self._costs is not None
                        else self._gate_switches)
            out["cost_switches"] = float(switches - self._switches_before)
            self._switches_before = switches
        if self._costs is not None:
            ratio = self._costs.model.predicted_ratio()
            if ratio is not None:
                out["predicted_ratio"] = ratio
        return out

    @property
    def kept_fraction(self) -> float:
        """Kept share of what this rank scored since the last `summary()` (no collective)."""
        return float(self._stats[2] / max(self._stats[1], 1))

    @property
    def service_rounds(self) -> int:
        """Rounds this rank trained on the service's plans."""
        return self.service_rounds_before + self._plans.service_rounds

    @property
    def fallback_rounds(self) -> int:
        """Rounds this rank trained on a local shuffle because the service was away."""
        return self.fallback_rounds_before + self._plans.fallback_rounds

    def state_dict(self) -> dict[str, Any]:
        """What to save in your checkpoint; the plans themselves are the service's."""
        state: dict[str, Any] = {
            "step": self.step, "epoch": self.epoch, "service_rounds": self.service_rounds,
            "fallback_rounds": self.fallback_rounds}
        if self._costs is not None:
            state["cost_model"] = self._costs.state_dict()
        if self._gate is not None:
            state["filter_gate"] = {"pos": list(self._round_pos),
                                    "shrink_below": self._shrink_below,
                                    "counts": self._gate_counts.tolist(),
                                    "shares": list(self._gate_shares),
                                    "filters": self._gate_filters,
                                    "switches": self._gate_switches}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from `state_dict()`: step numbers, round counters and the cost model's
        mode and estimates go on (a state without the cost model's starts it afresh)."""
        self.step = int(state["step"])
        if self._costs is not None and "cost_model" in state:
            self._costs.load_state_dict(state["cost_model"])
            self._switches_before = len(self._costs.model.decisions)
        if self._gate is not None and "filter_gate" in state:
            g = state["filter_gate"]
            self._round_pos = (int(g["pos"][0]), int(g["pos"][1]))
            self._gate_counts[:] = g["counts"]
            self._gate_shares = [float(x) for x in g["shares"]]
            self._gate_filters = bool(g["filters"])
            self._gate_switches = int(g["switches"])
            self._shrink_below = g.get("shrink_below")
            self._switches_before = self._gate_switches
        self.sampler.set_epoch(int(state["epoch"]))
        self.service_rounds_before = int(state["service_rounds"]) - self._plans.service_rounds
        self.fallback_rounds_before = int(state["fallback_rounds"]) - self._plans.fallback_rounds

    # -- the end -------------------------------------------------------------------------------

    def close(self, timeout_s: float = 60.0) -> Any:
        """Flushes the loss reporter it made (up to `timeout_s`);
        returns that reporter's delivery report (None without one)."""
        if self._costs is not None:
            self._costs.interrupt()
        delivery = None
        if self._own_reporter and self.reporter is not None:
            delivery = self.reporter.close(timeout_s)  # type: ignore[attr-defined]
            self._own_reporter = False
        if self._client is not None:
            self._client.close()
        return delivery

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class _Selection:
    ids: torch.Tensor
    scored: torch.Tensor | None  # CPU float32, or None on a full step (filter off)
    keep: torch.Tensor | None  # CPU indices, or None on a full step
    count: float  # kept over all ranks
    loss_share: float


def _nonfinite_full(step: int, ranks: float) -> ValueError:
    return ValueError(
        f"NaN or inf loss at step {step} on {int(ranks)} rank(s), a full step (the batch was "
        "not scored: filter off, or turned off by the gate or the cost model); pass "
        "nonfinite='keep' to train on")


def _default_device() -> torch.device:
    if "ray.train" in sys.modules:  # only inside Ray does asking Ray make sense (and is cheap)
        try:
            import ray.train.torch

            return torch.device(ray.train.torch.get_device())
        except Exception:  # noqa: BLE001 - not in a Ray Train worker: fall through
            pass
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _token() -> str | None:
    # Plans are a write at the service: they need its token, from the environment only, so it
    # never lands in a config that Ray stores.
    return os.environ.get("HARDBATCH_API_TOKEN") or None
