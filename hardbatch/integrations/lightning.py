"""hardbatch in a PyTorch Lightning `Trainer`: one callback, one method on your module.

Your `LightningModule` says how to get one loss per example; the callback does the rest::

    class Model(L.LightningModule):
        def per_sample_loss(self, batch):               # the hook: reduction="none"
            x, y = batch
            return F.cross_entropy(self(x), y, reduction="none")

        def training_step(self, batch, batch_idx):     # yours; unused while hardbatch trains
            return self.per_sample_loss(batch).mean()

    hb = HardbatchCallback(config, train_set, batch_size=64)   # config: driver.worker_config
    trainer = L.Trainer(max_epochs=3, callbacks=[hb])          # any strategy="ddp" flavour
    trainer.fit(model, train_dataloaders=hb.loader)

While fitting, the callback owns the training step: it scores the batch with `per_sample_loss`
(no grad), keeps the examples carrying most of the loss, and returns `Worker.loss` of
`per_sample_loss` on those: summed, importance-weighted when plans carry weights, divided by
the kept count over all ranks, and streamed to the loss store. Your `training_step` is put back
at teardown. The batches come from the run's plans (`hb.loader`, a `Worker`'s loader made once
Lightning has set up torch.distributed); the callback sets its round each epoch itself, so
nothing depends on Lightning calling `set_epoch` on the right object (Lightning #13316).

Under Ray Train (`ray.train.lightning`) nothing changes: `RayDDPStrategy`,
`RayLightningEnvironment`, `prepare_trainer` and `RayTrainReportCallback` work as usual; the
callback logs `hardbatch/kept` and `hardbatch/loss_share` at each epoch's end, which
`RayTrainReportCallback` reports if it comes after it in `callbacks`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device

from hardbatch.integrations import check_per_sample, take
from hardbatch.trainer.worker import PlanSampler, Reporter, Worker, WorkerConfig

HOOK = "per_sample_loss"


class HardbatchCallback(pl.Callback):
    """Plan-driven batches, the loss filter and the normalized loss for a `LightningModule`
    that has a `per_sample_loss(batch) -> Tensor` method (one loss per example).

    Args:
        config: a `Driver`'s `worker_config`, a `WorkerConfig`, or None (a local shuffle, the
            filter on, nothing streamed), as for `hardbatch.Worker`.
        dataset: the training set (map-style; its index is the sample id).
        batch_size: examples per batch on each rank (scored; the filter keeps a part).
        reporter: where scored losses go instead of the config's loss store.
        **loader_kwargs: more `DataLoader` arguments (`num_workers`, `collate_fn`, ...).

    Pass `callback.loader` to `trainer.fit` as the training data.

    Example:
        >>> import lightning.pytorch as pl
        >>> from torch.utils.data import TensorDataset
        >>> class Model(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(4, 2)
        ...     def per_sample_loss(self, batch):
        ...         x, y = batch
        ...         return torch.nn.functional.cross_entropy(self.net(x), y, reduction="none")
        ...     def training_step(self, batch, batch_idx):
        ...         return self.per_sample_loss(batch).mean()
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
        >>> hb = HardbatchCallback(None, data, batch_size=16)
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[hb], accelerator="cpu", logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(Model(), train_dataloaders=hb.loader)
        >>> hb.last_summary["steps"]
        4.0
    """

    def __init__(self, config: WorkerConfig | Mapping[str, Any] | None, dataset: Any,
                 batch_size: int, *, reporter: Reporter | None = None,
                 **loader_kwargs: Any) -> None:
        self.config = WorkerConfig.of(config)  # bad settings fail here, not inside fit
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size = dataset, batch_size
        self._reporter, self._loader_kwargs = reporter, loader_kwargs
        self.worker: Worker | None = None
        self.loader = PlanLoader(self)
        self.last_summary: dict[str, float] = {}
        self._state: Mapping[str, int] | None = None
        self._module: pl.LightningModule | None = None

    # -- setup: the hook is checked before anything trains ----------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not callable(getattr(pl_module, HOOK, None)):
            raise TypeError(
                f"{type(pl_module).__name__} has no {HOOK}(batch) method: hardbatch needs one "
                f"loss per example (reduction='none') to choose which examples to train on")
        # torch.distributed is up by now (Lightning's DDP, or Ray Train before the Trainer),
        # so the worker knows its rank.
        self.worker = Worker(self.config, self.dataset, self.batch_size, reporter=self._reporter,
                             device=trainer.strategy.root_device, **self._loader_kwargs)
        if self._state is not None:
            self.worker.load_state_dict(self._state)
        self._module = pl_module
        pl_module.training_step = self.training_step  # type: ignore[method-assign]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The model is on its device now: try the hook on two examples, so a hook that returns
        # a batch mean fails here rather than at the first step.
        assert self.worker is not None
        n = min(2, len(self.dataset))
        ids, batch = self.worker.loader.collate_fn([(i, self.dataset[i]) for i in range(n)])
        batch = move_data_to_device(batch, pl_module.device)
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()  # no batch-norm statistics from the probe
        try:
            with torch.no_grad():
                check_per_sample(getattr(pl_module, HOOK)(batch), n,
                                 f"{type(pl_module).__name__}.{HOOK}(batch)")
        finally:
            for m, mode in modes.items():
                m.training = mode

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.train_dataloader is not self.loader:
            raise ValueError("hardbatch plans the training batches: pass the callback's loader "
                             "to fit, `trainer.fit(model, train_dataloaders=callback.loader)`")

    # -- each step and epoch -----------------------------------------------------------------

    def training_step(self, batch: tuple[torch.Tensor, Any], batch_idx: int = 0,
                      *args: Any, **kwargs: Any) -> torch.Tensor:
        """The step Lightning runs while the callback is set up: select, then `Worker.loss`."""
        assert self.worker is not None and self._module is not None
        ids, data = batch
        per_sample_loss = getattr(self._module, HOOK)
        keep = self.worker.select(ids, lambda: per_sample_loss(data))
        return self.worker.loss(per_sample_loss(take(data, keep, len(ids))))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning sets the epoch on the sampler it finds, and creates the first epoch's
        # iterator before this hook; from the second epoch on, this is what picks the round.
        assert self.worker is not None
        if trainer.current_epoch != self.worker.epoch:
            self.worker.sampler.set_epoch(trainer.current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning has stepped its per-step schedulers once; a packed round's step covers
        # more of the epoch: catch them up, so the schedule still ends where it would have.
        assert self.worker is not None
        for config in trainer.lr_scheduler_configs:
            if config.interval == "step" and not config.reduce_on_plateau \
                    and config.frequency == 1:
                self.worker.schedule_step(config.scheduler)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.worker is not None
        self.last_summary = self.worker.summary()  # a collective: every rank is here
        # The same numbers on every rank; sync_dist only keeps Lightning from warning.
        pl_module.log_dict({"hardbatch/kept": self.last_summary["samp_perc"],
                            "hardbatch/loss_share": self.last_summary["loss_perc"]},
                           sync_dist=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.worker is None:
            return
        if pl_module.__dict__.get("training_step") == self.training_step:
            del pl_module.training_step  # the module's own step again
        self._state = self.worker.state_dict()
        self.worker.close()
        self.worker, self._module = None, None

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return dict(self.worker.state_dict() if self.worker is not None else self._state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._state = state_dict
        if self.worker is not None:  # restored after setup: before the first batch is drawn
            self.worker.load_state_dict(state_dict)


class PlanLoader:
    """The training data of a `HardbatchCallback`: its worker's `(ids, batch)` loader, which
    exists only once the trainer has set the callback up (then the rank is known)."""

    def __init__(self, callback: HardbatchCallback) -> None:
        self._callback = callback

    def _worker(self) -> Worker:
        if self._callback.worker is None:
            raise RuntimeError("this loader belongs to a HardbatchCallback that is not set up: "
                               "add the callback to the Trainer, `Trainer(callbacks=[hb])`")
        return self._callback.worker

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        # A generator: Lightning calls iter() once just to check the type, and that must not
        # ask the service for a round.
        yield from self._worker().loader

    def __len__(self) -> int:
        # A full epoch's batches: Lightning sizes the run (estimated_stepping_batches, for LR
        # schedules) from it once; a packed round yields fewer, full ones and ends the epoch
        # there, and the callback catches per-step schedules up.
        return self._worker().steps_per_epoch

    @property
    def sampler(self) -> PlanSampler:
        """The plan sampler, where Lightning looks for `set_epoch`."""
        return self._worker().sampler
