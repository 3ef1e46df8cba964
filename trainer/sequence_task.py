"""A sequence task: a small recurrent model predicting the next token of synthetic text.

The text is sampled offline from a hidden Markov model (a fixed random one per data seed):
the next token depends on a hidden state the model must infer from the context, so the
validation loss keeps falling for many epochs towards the source's entropy, never to zero.
Logits are per position; a sample's loss is the mean over its positions, so losses are flat
across samples (every sample is drawn from the same source), unlike classification tasks
where a few examples carry most of the loss. The task is judged by validation loss.

Example:
    >>> task = make(TaskArgs(num_samples=200, width=16))
    >>> x, y = task.train[0]
    >>> tuple(x.shape), tuple(y.shape), task.metric
    ((32,), (32,), 'val_loss')
"""

from __future__ import annotations

import numpy as np
import torch
from hardbatch.trainer.task import Task, TaskArgs, check_extra
from torch import nn
from torch.utils.data import TensorDataset

VAL_SAMPLES = 5_000
LENGTH = 32  # positions predicted per sample
VOCAB = 16
STATES = 12
CONCENTRATION = 0.08  # Dirichlet concentration of transitions and emissions (lower: sparser)


def make_arrays(num_train: int, num_val: int, seed: int) -> dict[str, np.ndarray]:
    """Token sequences of LENGTH + 1 from one random HMM: inputs are the first LENGTH tokens,
    targets the last LENGTH (each position predicts the next token)."""
    rng = np.random.default_rng([seed, 11])
    trans = rng.dirichlet(np.full(STATES, CONCENTRATION), size=STATES)
    emit = rng.dirichlet(np.full(VOCAB, CONCENTRATION), size=STATES)
    n = num_train + num_val
    tokens = np.empty((n, LENGTH + 1), dtype=np.int64)
    state = rng.integers(0, STATES, size=n)
    for t in range(LENGTH + 1):
        tokens[:, t] = _draw(rng, emit[state])
        state = _draw(rng, trans[state])
    x, y = tokens[:, :-1], tokens[:, 1:]
    return {"x": x[:num_train], "y": y[:num_train], "x_val": x[num_train:],
            "y_val": y[num_train:]}


def _draw(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of `probs` (rows are distributions)."""
    u = rng.random((len(probs), 1))
    return np.minimum((probs.cumsum(axis=1) < u).sum(axis=1), probs.shape[1] - 1)


class GRULM(nn.Module):
    """Token embeddings, a one-layer GRU and a linear head; returns logits as
    (B, VOCAB, LENGTH), the layout `F.cross_entropy` takes. A GRU can track the source's
    hidden state and is the cheapest sequence model on a CPU at this size."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0]).transpose(1, 2)


def make(args: TaskArgs) -> Task:
    """The sequence task: `args.num_samples` training sequences, up to 5,000 validation ones.

    `--task-arg data_seed=N` draws another source (default 42). It takes no `noise`: a flipped
    token is just more text from another source.
    """
    check_extra(args.extra, ("data_seed",), "sequence")
    if args.num_samples < 1 or args.width < 1:
        raise ValueError(f"num_samples and width must be >= 1, got {args.num_samples}, "
                         f"{args.width}")
    num_val = min(VAL_SAMPLES, max(args.num_samples // 5, 100))
    a = make_arrays(args.num_samples, num_val, int(args.extra.get("data_seed", 42)))
    torch.manual_seed(args.seed)
    return Task(
        model=GRULM(args.width),
        train=TensorDataset(torch.from_numpy(a["x"]), torch.from_numpy(a["y"])),
        val=TensorDataset(torch.from_numpy(a["x_val"]), torch.from_numpy(a["y_val"])),
        num_classes=VOCAB, metric="val_loss",
    )
