"""hardbatch: train on the examples that matter.

This file is the public surface; every name in `__all__` is documented where it is defined
and stays stable. Everything else (`hardbatch.sampler`, `hardbatch.trainer`,
`hardbatch.services`) is the implementation and may change.

**Your own training loop** (one process, or each Ray Train worker): a `Worker` gives plan-driven
batches with their sample ids, picks the examples worth a backward pass, and normalizes the
loss over all ranks::

    hb = hardbatch.Worker(config.get("hardbatch"), train_set, batch_size=256)
    for epoch in range(epochs):
        for ids, (x, y) in hb.batches(epoch):
            keep = hb.select(ids, lambda: loss_fn(model(x), y))   # scoring forward, no grad
            loss = hb.loss(loss_fn(model(x[keep]), y[keep]))     # per-sample losses in
            optimizer.zero_grad(); loss.backward(); optimizer.step()
    hb.close()

`hb.loader` is the same batches as a `DataLoader` whose sampler is a `DistributedSampler`, so
`ray.train.torch.prepare_data_loader(hb.loader)` keeps the plan (and moves batches to the
device); then call `loader.sampler.set_epoch(epoch)` each epoch. `hb.state_dict()` goes into
your checkpoint. With no config, a `Worker` shuffles locally and streams nothing.

**The driver** around your own `TorchTrainer`: a `Driver` brings up (or joins) the loss store,
the sampler service and Ray, registers the run and hands the workers their config::

    with hardbatch.Driver(num_samples=len(train_set), rounds=epochs) as driver:
        TorchTrainer(train_loop, train_loop_config={"hardbatch": driver.worker_config},
                     scaling_config=ScalingConfig(num_workers=2)).fit()
        print(driver.top(10))        # the hardest samples so far

**The built-in loop**: `fit(TrainConfig(...))` in one process, `launch(JobConfig(...))` on Ray
Train (what `hardbatch train` runs); a `Task` names your model and data for both.

**The filter alone**: `select(losses, min_loss_perc=0.9)` and `LossShareFilter`.

Example:
    >>> import hardbatch, torch
    >>> hardbatch.select(torch.tensor([0.1, 5.0, 0.2, 3.0]), min_loss_perc=0.9).indices.tolist()
    [1, 3]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    # your own loop
    "Worker", "WorkerConfig", "Driver", "PlanConfig",
    # the built-in loop
    "Task", "TaskArgs", "TrainConfig", "RunResult", "fit", "JobConfig", "JobResult", "launch",
    # the filter alone, and the service's client
    "select", "Selection", "LossShareFilter", "SamplerClient",
]

if TYPE_CHECKING:
    from hardbatch.sampler.filter import LossShareFilter, Selection, select
    from hardbatch.sampler.plans import PlanConfig
    from hardbatch.services.client import SamplerClient
    from hardbatch.trainer.distributed import JobConfig
    from hardbatch.trainer.driver import Driver
    from hardbatch.trainer.launch import JobResult, launch
    from hardbatch.trainer.task import Task, TaskArgs
    from hardbatch.trainer.train import RunResult, TrainConfig, fit
    from hardbatch.trainer.worker import Worker, WorkerConfig

# Where each name lives. Loaded on first use, so `import hardbatch.services...` (the service's
# image) does not pull in torch and the training side.
_WHERE = {
    "hardbatch.trainer.worker": ("Worker", "WorkerConfig"),
    "hardbatch.trainer.driver": ("Driver",),
    "hardbatch.sampler.plans": ("PlanConfig",),
    "hardbatch.trainer.task": ("Task", "TaskArgs"),
    "hardbatch.trainer.train": ("TrainConfig", "RunResult", "fit"),
    "hardbatch.trainer.distributed": ("JobConfig",),
    "hardbatch.trainer.launch": ("JobResult", "launch"),
    "hardbatch.sampler.filter": ("select", "Selection", "LossShareFilter"),
    "hardbatch.services.client": ("SamplerClient",),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'hardbatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
