"""A tabular task: an MLP on synthetic rows, generated with numpy (nothing is downloaded).

The rows look like a real table: numeric columns on different scales (some log-normal, some
heavy-tailed, some irrelevant) and categorical columns (one-hot). The label is the class a
fixed random teacher network gives the underlying factors, so a model can learn it to high
accuracy, but the boundary is curved and the columns hide the factors behind monotone
transforms: an MLP keeps improving for many epochs instead of saturating in one.

Example:
    >>> task = make(TaskArgs(num_samples=1000, width=16))
    >>> task.num_samples, len(task.val), task.num_classes
    (1000, 200)
"""

from __future__ import annotations

import numpy as np
import torch
from hardbatch.trainer.task import Task, TaskArgs, generated_task
from torch import nn

NUMERIC = 24  # numeric columns; the first INFORMATIVE carry the label, the rest are noise
INFORMATIVE = 12
CATEGORICAL = 4  # categorical columns with LEVELS levels each, all informative
LEVELS = 6
CLASSES = 5
TEACHER_HIDDEN = 12
SCALE = 0.8  # teacher weight scale: larger bends the boundary more (harder)


def make_arrays(num_train: int, num_val: int, seed: int) -> dict[str, np.ndarray]:
    """`num_train` training and `num_val` validation rows (features standardized on the
    training rows) with their labels; the same for the same seed."""
    rng = np.random.default_rng([seed, 7])
    n = num_train + num_val
    z = rng.standard_normal((n, NUMERIC))
    cats = rng.integers(0, LEVELS, size=(n, CATEGORICAL))
    onehot = np.zeros((n, CATEGORICAL * LEVELS))
    onehot[np.arange(n)[:, None], cats + LEVELS * np.arange(CATEGORICAL)] = 1.0

    # The teacher sees the latent factors; its weights are scaled so tanh bends the boundary.
    factors = np.concatenate([z[:, :INFORMATIVE], onehot], axis=1)
    w1 = rng.standard_normal((factors.shape[1], TEACHER_HIDDEN)) * SCALE / np.sqrt(INFORMATIVE)
    w2 = rng.standard_normal((TEACHER_HIDDEN, CLASSES))
    bias = rng.standard_normal(TEACHER_HIDDEN) * 0.5
    y = _balanced_argmax(np.tanh(factors @ w1 + bias) @ w2)

    # What the model sees: each numeric column through its own monotone transform, as raw
    # measurements are (amounts are log-normal, counts heavy-tailed), on its own scale.
    kind = np.arange(NUMERIC) % 3
    scale = np.exp(rng.uniform(-2, 3, NUMERIC))
    shown = np.where(kind == 0, z, np.where(kind == 1, np.exp(z), np.sinh(z))) * scale
    mean, std = shown[:num_train].mean(axis=0), shown[:num_train].std(axis=0) + 1e-9
    x = np.concatenate([(shown - mean) / std, onehot], axis=1).astype(np.float32)
    return {"x": x[:num_train], "y": y[:num_train].astype(np.int64),
            "x_val": x[num_train:], "y_val": y[num_train:].astype(np.int64)}


def _balanced_argmax(scores: np.ndarray, steps: int = 200) -> np.ndarray:
    """Argmax of `scores` after per-class offsets that make the classes about equally common
    (a random teacher favours some classes; accuracy on a skewed table says less)."""
    offset = np.zeros(scores.shape[1])
    for _ in range(steps):
        counts = np.bincount((scores - offset).argmax(axis=1), minlength=scores.shape[1])
        offset += 0.05 * np.log((counts + 1) / (len(scores) / scores.shape[1]))
    return (scores - offset).argmax(axis=1)


class MLP(nn.Module):
    """Three hidden ReLU layers of `width` units; no batch norm (scoring must not move it)."""

    def __init__(self, features: int, width: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make(args: TaskArgs) -> Task:
    """The tabular task: `args.num_samples` training rows, up to 10,000 validation rows.

    `--task-arg data_seed=N` draws another table (default 42; run seeds vary only the model
    init and data order); `--task-arg noise=0.2` flips 20% of the training labels to another
    class (validation stays clean) and lists them in `Task.noisy_ids`.
    """
    return generated_task(args, "tabular", make_arrays,
                          lambda a: MLP(a["x"].shape[1], args.width, CLASSES), CLASSES)
