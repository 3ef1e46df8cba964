"""Your own Ray Train loop, with hardbatch added: the lines marked `# hardbatch`.

The loop is an ordinary one: a small CNN on MNIST-1D (generated offline by the `mnist1d`
package), SGD with Nesterov momentum, a OneCycle schedule, bf16 autocast and gradient clipping,
on 2 Ray Train workers. hardbatch adds, on each worker, the plan-driven loader, the selection
step and the loss normalized over ranks; around the `TorchTrainer`, a `Driver` that starts Ray,
Redis and the sampler service and registers the run. Run it from anywhere:

    python examples/ray_own_loop.py
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import ray.train
import ray.train.torch
import torch
from mnist1d.data import get_dataset_args, make_dataset
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn
from torch.utils.data import TensorDataset

import hardbatch

EPOCHS, BATCH, LR = 4, 128, 0.05


def mnist1d(n_train: int = 4000, n_val: int = 1000) -> tuple[TensorDataset, TensorDataset]:
    args = get_dataset_args()
    args.num_samples, args.train_split = n_train + n_val, n_train / (n_train + n_val)
    d = make_dataset(args)

    def tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.tensor(x, dtype=torch.float32).unsqueeze(1),
                             torch.tensor(y, dtype=torch.long))

    return tensors(d["x"], d["y"]), tensors(d["x_test"], d["y_test"])


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
        nn.Flatten(), nn.Linear(32 * 10, 10))


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, device: torch.device) -> float:
    x, y = (t.to(device) for t in data.tensors)
    return float((model(x).argmax(-1) == y).float().mean())


def train_loop(config: dict) -> None:
    train_set, val_set = config["data"]
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(net())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss(reduction="none")  # hardbatch: per-sample losses
    hb = hardbatch.Worker(config["hardbatch"], train_set, batch_size=BATCH)  # hardbatch
    loader = ray.train.torch.prepare_data_loader(hb.loader)  # hardbatch: was a DataLoader
    scheduler = torch.optim.lr_scheduler.OneCycleLR(  # hardbatch: a full epoch's steps
        optimizer, max_lr=LR, total_steps=EPOCHS * hb.steps_per_epoch)
    for epoch in range(EPOCHS):
        loader.sampler.set_epoch(epoch)
        for ids, (x, y) in loader:  # hardbatch: was `for x, y in loader`
            with torch.autocast(device.type, dtype=torch.bfloat16):
                keep = hb.select(ids, lambda: loss_fn(model(x), y))  # hardbatch
                loss = hb.loss(loss_fn(model(x[keep]), y[keep]))  # hardbatch: was loss_fn(...)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            hb.schedule_step(scheduler)  # hardbatch: was scheduler.step()
        metrics = {"epoch": epoch + 1, "accuracy": accuracy(model, val_set, device),
                   **hb.summary(),  # hardbatch: kept share, share of steps filtered
                   "service_rounds": hb.service_rounds}  # hardbatch
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if ray.train.get_context().get_world_rank() == 0:
                torch.save({"model": model.module.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "hardbatch": hb.state_dict()},  # hardbatch
                           os.path.join(d, "state.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
    hb.close()  # hardbatch


def main() -> None:
    train_set, val_set = mnist1d()
    with hardbatch.Driver(num_samples=len(train_set), rounds=EPOCHS) as driver:  # hardbatch
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"data": (train_set, val_set),
                               "hardbatch": driver.worker_config},  # hardbatch
            scaling_config=ScalingConfig(num_workers=2))
        result = trainer.fit()
    m = result.metrics
    # The cost model runs the steps where scoring does not pay in full (all kept, unscored).
    print(f"final accuracy {m['accuracy']:.4f} (kept {m['samp_perc']:.0%} of the scored "
          f"examples, filtered {m['filter_steps']:.0%} of the last epoch's steps; "
          f"{m['service_rounds']} of {EPOCHS} rounds planned by the service)")


if __name__ == "__main__":
    main()
