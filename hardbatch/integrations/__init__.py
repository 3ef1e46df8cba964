"""hardbatch inside other trainers: PyTorch Lightning and Hugging Face `transformers`.

Each is an optional extra and a module of its own, imported by name; importing `hardbatch`
or `hardbatch.trainer` never imports Lightning or transformers:

- `hardbatch.integrations.lightning` (`pip install hardbatch[lightning]`): a `Callback` and a
  `per_sample_loss(batch)` method on your `LightningModule`.
- `hardbatch.integrations.transformers` (`pip install hardbatch[transformers]`): a `Trainer`
  subclass and a `TrainerCallback`, for models returning `ModelOutput` and dict batches.

Both are thin layers over `hardbatch.Worker`: its plan-driven batches, its `select` and its
`loss`, so the loss they backpropagate is the one `Worker.loss` computes. This file holds what
both share: cutting a batch down to the examples the filter kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def take(batch: Any, keep: torch.Tensor | slice, n: int) -> Any:
    """The examples `keep` of a batch of `n`: every tensor whose first dimension is `n` is
    indexed; dicts, lists and tuples (named too) are walked; anything else stays as it is.

    Example:
        >>> batch = {"x": torch.arange(6).view(3, 2), "y": torch.tensor([0, 1, 0]), "tag": "a"}
        >>> take(batch, torch.tensor([2, 0]), n=3)
        {'x': tensor([[4, 5],
                [0, 1]]), 'y': tensor([0, 0]), 'tag': 'a'}
    """
    if isinstance(keep, slice):
        return batch
    if isinstance(batch, torch.Tensor):
        return batch[keep.to(batch.device)] if batch.dim() and len(batch) == n else batch
    if isinstance(batch, Mapping):
        return {k: take(v, keep, n) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(take(v, keep, n) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(take(v, keep, n) for v in batch)
    return batch


def check_per_sample(losses: Any, n: int, where: str) -> None:
    """Raises a clear `TypeError` unless `losses` holds one loss per example of a batch of
    `n` (shape `(n,)` or `(n, ...)`), as the filter needs."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"{where} must return a tensor of per-example losses, got "
                        f"{type(losses).__name__}")
    if losses.dim() == 0 or len(losses) != n:
        raise TypeError(
            f"{where} must return one loss per example (shape ({n},) for a batch of {n}, i.e. "
            f"reduction='none'), got shape {tuple(losses.shape)}: hardbatch filters examples "
            f"by their own losses, which a batch mean hides")
