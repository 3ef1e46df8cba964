"""The built-in task: MNIST-1D with a small 1-D CNN.

MNIST-1D (Greydanus & Kobak) is generated offline by `mnist1d.data.make_dataset`; it is never
downloaded. Generated arrays are cached under `~/.cache/hardbatch` (or `HARDBATCH_CACHE`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from hardbatch.trainer.task import Task, TaskArgs, check_extra, flip_labels, noise_share
from torch import nn
from torch.utils.data import TensorDataset

VAL_SAMPLES = 10_000
LENGTH = 40


def _cache_dir() -> Path:
    return Path(os.environ.get("HARDBATCH_CACHE", Path.home() / ".cache" / "hardbatch"))


def make_arrays(num_train: int, num_val: int, seed: int) -> dict[str, np.ndarray]:
    """Generates (or loads from cache) `num_train` training and `num_val` validation samples."""
    path = _cache_dir() / f"mnist1d-{num_train}-{num_val}-{seed}.npz"
    if path.exists():
        with np.load(path) as z:
            return dict(z)
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_train + num_val
    args.train_split = num_train / args.num_samples
    args.seed = seed
    data = make_dataset(args)
    arrays = {
        "x": data["x"][:num_train].astype(np.float32), "y": data["y"][:num_train].astype(np.int64),
        "x_val": data["x_test"][:num_val].astype(np.float32),
        "y_val": data["y_test"][:num_val].astype(np.int64),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)  # atomic, so parallel workers never read half a file
    return arrays


class ConvNet1D(nn.Module):
    """Three conv layers and a linear head; no batch norm, so scoring a batch in train mode
    does not disturb any running statistics."""

    def __init__(self, width: int = 64, num_classes: int = 10, length: int = LENGTH):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2), nn.ReLU(),
            nn.Conv1d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
        )
        self.head = nn.Linear(width * (length // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


def make(args: TaskArgs) -> Task:
    """MNIST-1D: `args.num_samples` training samples and up to 10,000 validation samples.

    `--task-arg data_seed=N` picks another generated dataset (default 42, mnist1d's own);
    `--task-arg noise=0.2` flips 20% of the training labels (validation stays clean).
    """
    check_extra(args.extra, ("data_seed", "noise"), "mnist1d")
    if args.num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {args.num_samples}")
    if args.width < 1:
        raise ValueError(f"width must be >= 1, got {args.width}")
    num_val = min(VAL_SAMPLES, max(args.num_samples // 5, 100))
    # The data stay the same across run seeds (which vary init and order) unless asked.
    data_seed = int(args.extra.get("data_seed", 42))
    a = make_arrays(args.num_samples, num_val, seed=data_seed)
    y, noisy = flip_labels(a["y"], noise_share(args.extra), 10, seed=data_seed)
    torch.manual_seed(args.seed)
    return Task(
        model=ConvNet1D(args.width),
        train=TensorDataset(torch.from_numpy(a["x"]), torch.from_numpy(y)),
        val=TensorDataset(torch.from_numpy(a["x_val"]), torch.from_numpy(a["y_val"])),
        num_classes=10, noisy_ids=noisy,
    )
