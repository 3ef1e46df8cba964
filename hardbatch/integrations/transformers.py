"""hardbatch in a Hugging Face `transformers.Trainer`: a `Trainer` subclass and its callback.

For models that return a `ModelOutput` and datasets of dicts (what `Trainer` expects)::

    trainer = HardbatchTrainer(model=model, args=args, train_dataset=train_set,
                               hardbatch=config)   # config: a Driver's worker_config, or None
    trainer.train()

`HardbatchTrainer` plans the training batches (`get_train_dataloader`: a `Worker` over
`train_dataset`, batches of `per_device_train_batch_size` collated by `data_collator`, the
sample ids riding along in the batch dict) and owns the training loss (`compute_loss`): it
scores the batch without grad, keeps the examples carrying most of the loss, and returns
`Worker.loss` of the kept examples' per-example losses: summed, importance-weighted when plans
carry weights, divided by the kept count over all ranks, streamed to the loss store.
Evaluation batches carry no ids and get the model's own loss.

The per-example loss is `per_sample_loss(outputs, inputs)`; the default is the cross-entropy of
`outputs.logits` against `inputs["labels"]` (positions labelled -100 ignored; a sequence's loss
is the mean over its positions; float labels: squared error). Models whose `loss` comes from
anything else (a causal LM shifting its labels, a custom head) pass their own function. The
default is tried on two examples when training starts, so a model without logits or a batch
without labels fails there, not after an epoch.

Under Ray Train (`ray.train.huggingface.transformers`): `prepare_trainer(trainer)` keeps these
methods (it subclasses the trainer's class) and `RayTrainReportCallback` reports the
`hardbatch_kept` and `hardbatch_loss_share` that `HardbatchCallback` logs at each epoch's end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from hardbatch.integrations import check_per_sample, take
from hardbatch.trainer.task import IdCollate, IdDataset
from hardbatch.trainer.worker import Reporter, Worker, WorkerConfig

IDS = "hardbatch_ids"  # the batch key of the sample ids, taken out before the forward

PerSampleLoss = Callable[[Any, Mapping[str, Any]], torch.Tensor]


def logits_loss(outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
    """One loss per example from `outputs.logits` and `inputs["labels"]`: cross-entropy
    (labels -100 ignored, averaged over an example's positions), or the squared error for
    float labels (regression).

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> logits_loss({"logits": logits}, {"labels": torch.tensor([0, 0])}).round(decimals=3)
        tensor([0.1270, 2.1270])
    """
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
    labels = inputs.get("labels")
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            "the default per-example loss needs outputs.logits and a 'labels' entry in the "
            f"batch (got outputs {type(outputs).__name__}, batch keys {sorted(inputs)}); pass "
            "per_sample_loss=fn(outputs, inputs) -> one loss per example")
    if labels.is_floating_point():
        per = F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="none")
        return per.flatten(1).mean(1) if per.dim() > 1 else per
    per = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100,
                          reduction="none").view(labels.shape)
    if per.dim() == 1:
        return per
    counted = (labels != -100).flatten(1).sum(1).clamp(min=1)
    return per.flatten(1).sum(1) / counted


class HardbatchTrainer(Trainer):
    """A `transformers.Trainer` that trains on plan-driven batches with the loss filter.

    Args:
        *args: `Trainer`'s arguments (model, args, train_dataset, data_collator, ...).
        hardbatch: a `Driver`'s `worker_config`, a `WorkerConfig`, or None (a local shuffle,
            the filter on, nothing streamed), as for `hardbatch.Worker`.
        per_sample_loss: `fn(outputs, inputs) -> Tensor`, one loss per example [default:
            `logits_loss`].
        reporter: where scored losses go instead of the config's loss store.
        **kwargs: more `Trainer` arguments.

    `gradient_accumulation_steps > 1` averages the normalized losses of the micro-batches.
    """

    # Trainer divides our per-batch loss by the accumulation steps itself.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, hardbatch: WorkerConfig | Mapping[str, Any] | None = None,
                 per_sample_loss: PerSampleLoss | None = None,
                 reporter: Reporter | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hardbatch_config = WorkerConfig.of(hardbatch)
        if per_sample_loss is not None and not callable(per_sample_loss):
            raise TypeError(f"per_sample_loss must be a function (outputs, inputs) -> "
                            f"losses, got {type(per_sample_loss).__name__}")
        self.per_sample_loss: PerSampleLoss = per_sample_loss or logits_loss
        # Our loss is normalized here; Trainer must not count label tokens to rescale it.
        self.model_accepts_loss_kwargs = False
        self._reporter = reporter
        self.worker: Worker | None = None
        self.add_callback(HardbatchCallback(self))

    def get_train_dataloader(self) -> DataLoader:
        """This rank's batches of the run's plans, each a dict with the sample ids under
        `hardbatch_ids`. Not passed through `accelerator.prepare`: plans are per rank already,
        and `Trainer` moves each batch to the device itself."""
        if self.train_dataset is None:
            raise ValueError("HardbatchTrainer: training requires a train_dataset")
        if self.worker is not None:
            self.worker.close()
        args = self.args
        # torch.distributed is up by now (TrainingArguments, or Ray Train), so the worker
        # knows its rank.
        self.worker = Worker(self.hardbatch_config, self.train_dataset, self._train_batch_size,
                             reporter=self._reporter, device=args.device)
        loader = FullEpochLoader(IdDataset(self.train_dataset), self.worker.steps_per_epoch,
                                 batch_size=self._train_batch_size, sampler=self.worker.sampler,
                                 collate_fn=IdsInBatch(IdCollate(self.data_collator)),
                                 num_workers=args.dataloader_num_workers,
                                 pin_memory=args.dataloader_pin_memory)
        self._check_per_sample_loss(loader)
        return loader

    def _check_per_sample_loss(self, loader: DataLoader) -> None:
        # Two examples through the model now, so a model or batch the loss function cannot
        # use fails before training starts.
        n = min(2, len(self.train_dataset))  # type: ignore[arg-type]
        inputs = loader.collate_fn([(i, self.train_dataset[i])  # type: ignore[index]
                                    for i in range(n)])
        inputs = self._prepare_inputs(inputs)
        inputs.pop(IDS)
        model = self.model
        assert model is not None  # Trainer refuses to start without one
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                losses = self.per_sample_loss(model(**inputs), inputs)
        finally:
            model.train(was_training)
        check_per_sample(losses, n, "per_sample_loss(outputs, inputs)")

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any],
                     return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        """`Worker.loss` of the kept examples for training batches (they carry ids);
        `Trainer`'s own loss for any other batch (evaluation)."""
        if IDS not in inputs or self.worker is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        ids = inputs.pop(IDS)
        keep = self.worker.select(ids, lambda: self.per_sample_loss(model(**inputs), inputs))
        kept = take(inputs, keep, len(ids))
        outputs = model(**kept)
        loss = self.worker.loss(self.per_sample_loss(outputs, kept))
        return (loss, outputs) if return_outputs else loss


class FullEpochLoader(DataLoader):
    """A `DataLoader` whose length is a full epoch's batches: `Trainer` sizes its run
    (`max_steps`) and its LR schedule from it once, and a packed round yields fewer, full
    batches (the epoch ends when they do; `HardbatchCallback` catches the schedule up)."""

    def __init__(self, dataset: Any, full_batches: int, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.full_batches = full_batches

    def __len__(self) -> int:
        return self.full_batches

    def set_epoch(self, epoch: int) -> None:
        # Trainer's own epoch index: `state.epoch` lags behind it once rounds are packed.
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]


class IdsInBatch:
    """Collates `(ids, dict batch)` into the dict with the ids under `hardbatch_ids` (a class,
    so DataLoader worker processes can pickle it)."""

    def __init__(self, collate: IdCollate) -> None:
        self.collate = collate

    def __call__(self, pairs: Any) -> dict[str, Any]:
        ids, batch = self.collate(pairs)
        if not isinstance(batch, Mapping):
            raise TypeError(f"HardbatchTrainer needs dict batches (a dataset of dicts, or a "
                            f"data_collator returning one), got {type(batch).__name__}")
        return {**batch, IDS: ids}


class HardbatchCallback(TrainerCallback):
    """The epoch side of a `HardbatchTrainer` (which adds it itself): picks each epoch's
    round, logs the kept fraction and loss share at each epoch's end, and flushes the loss
    reporter when training ends."""

    def __init__(self, trainer: HardbatchTrainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Trainer calls set_epoch only on loaders that have one, and not after skipping
        # batches on resume; state.epoch is the epoch here (fractional mid-epoch on resume).
        if self.trainer.worker is not None:
            self.trainer.worker.sampler.set_epoch(math.floor(state.epoch or 0))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Trainer has stepped its scheduler once; a packed round's step covers more of the
        # epoch: catch it up, so the schedule still ends where it would have.
        scheduler = kwargs.get("lr_scheduler") or self.trainer.lr_scheduler
        if self.trainer.worker is not None and scheduler is not None \
                and args.gradient_accumulation_steps == 1:
            self.trainer.worker.schedule_step(scheduler)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer.worker is not None:
            summary = self.trainer.worker.summary()  # a collective: every rank is here
            self.trainer.log({"hardbatch_kept": summary["samp_perc"],
                              "hardbatch_loss_share": summary["loss_perc"]})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer.worker is not None:
            self.trainer.worker.close()
            self.trainer.worker = None
