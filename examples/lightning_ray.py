"""PyTorch Lightning on Ray Train with hardbatch: 2 workers, an MLP on MNIST-1D.

    python examples/lightning_ray.py [--epochs 4] [--workers 2]

The driver side is one `hardbatch.Driver` (an embedded Redis loss store, the sampler service
in this process, a local Ray cluster). Each Ray worker runs an ordinary Lightning `Trainer` with
Ray's strategy, environment and report callback; hardbatch is the `HardbatchCallback` and the
module's `per_sample_loss`. MNIST-1D is generated on the spot (no download). Prints the final
validation accuracy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hardbatch

NUM_TRAIN, NUM_VAL = 4000, 1000


def mnist1d(num_train: int = NUM_TRAIN, num_val: int = NUM_VAL) -> tuple[TensorDataset, ...]:
    from hardbatch.trainer.mnist1d_task import make_arrays

    a = make_arrays(num_train, num_val, seed=0)
    return (TensorDataset(torch.from_numpy(a["x"]), torch.from_numpy(a["y"])),
            TensorDataset(torch.from_numpy(a["x_val"]), torch.from_numpy(a["y_val"])))


def make_module(lr: float = 3e-3) -> Any:
    """A small MLP LightningModule (a function, so Ray workers import Lightning, not this
    file's top level)."""
    import lightning.pytorch as pl

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 128),
                                     nn.ReLU(), nn.Linear(128, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def per_sample_loss(self, batch: Any) -> torch.Tensor:  # the hook hardbatch needs
            x, y = batch
            return F.cross_entropy(self(x), y, reduction="none")

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # without hardbatch
            return self.per_sample_loss(batch).mean()

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            acc = (self(x).argmax(1) == y).float().mean()
            self.log("val_acc", acc, sync_dist=True)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=lr)

    return MLP()


def train_loop(config: dict[str, Any]) -> None:
    """Each Ray Train worker: an ordinary Lightning Trainer plus the hardbatch callback."""
    import lightning.pytorch as pl
    from ray.train.lightning import (
        RayDDPStrategy,
        RayLightningEnvironment,
        RayTrainReportCallback,
        prepare_trainer,
    )

    from hardbatch.integrations.lightning import HardbatchCallback

    torch.set_num_threads(1)
    train_set, val_set = mnist1d()
    hb = HardbatchCallback(config["hardbatch"], train_set, batch_size=config["batch_size"])
    trainer = pl.Trainer(
        max_epochs=config["epochs"], accelerator="cpu", devices="auto",
        strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()],
        callbacks=[hb, RayTrainReportCallback()],  # hardbatch logs first, Ray reports it
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False)
    trainer = prepare_trainer(trainer)
    trainer.fit(make_module(), train_dataloaders=hb.loader,
                val_dataloaders=DataLoader(val_set, batch_size=500))


def main(argv: list[str] | None = None) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args(argv)
    mnist1d()  # generate (and cache) the data once, not in both workers at the same time

    with hardbatch.Driver(num_samples=NUM_TRAIN, rounds=args.epochs) as driver, \
            tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"hardbatch": driver.worker_config, "epochs": args.epochs,
                               "batch_size": args.batch_size},
            scaling_config=ScalingConfig(num_workers=args.workers,
                                         resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=driver.run, storage_path=storage))
        result = trainer.fit()
        info = driver.info()
    acc = float(result.metrics["val_acc"])
    print(f"kept {result.metrics['hardbatch/kept']:.2f} of the scored examples in the last "
          f"epoch; the store holds {info.get('records', '?')} loss records")
    print(f"final val_acc {acc:.3f}")
    return acc


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    main()
