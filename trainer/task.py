"""Tasks: what to train, on what data, with which per-sample loss.

A task is any function `make(args: TaskArgs) -> Task`, named by a dotted path
`package.module:function`, so users plug in their own model and data without editing hardbatch.
The built-in tasks also answer to short names: `mnist1d`, `tabular` and `sequence`.
Sample ids are the integer positions 0..N-1 of the training dataset: they must stay stable for
the whole run, because the loss store and the sampler address samples by them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

# Short names of the built-in tasks, for `--task`.
BUILTIN_TASKS = {
    "mnist1d": "hardbatch.trainer.mnist1d_task:make",
    "tabular": "hardbatch.trainer.tabular_task:make",
    "sequence": "hardbatch.trainer.sequence_task:make",
}
# What a task can be judged by: validation accuracy (higher is better) or loss (lower is).
METRICS = ("accuracy", "val_loss")


def logits_of(output: Any) -> torch.Tensor:
    """Finds the logits in what a model returned: a tensor, a tuple/list (first item), a dict
    (`"logits"` key) or an output object (`.logits` attribute, as Hugging Face models return).
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}; "
        "give the task a `logits` function"
    )


def cross_entropy(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Per-sample cross entropy (reduction='none') of any model output `logits_of` understands."""
    return F.cross_entropy(logits_of(output), target, reduction="none")


@dataclass
class Task:
    """A model, its data and how to score it.

    Attributes:
        model: the network; it may return a tensor, a tuple, a dict or an output object.
        train: training dataset; its index is the sample id. A `TensorDataset` is indexed
            directly (fast path); any other map-style dataset goes through a `DataLoader`.
        val: validation dataset.
        loss: `(model output, target) -> per-sample losses`, shape (B,) or (B, ...).
        logits: `model output -> logits` for accuracy: (B, C) for one label per sample, or
            per position (B, C, ...) as `F.cross_entropy` takes them, or (B, ..., C).
        num_classes: number of classes, for reporting.
        metric: what the task is judged by: "accuracy", or "val_loss" where accuracy says
            little (e.g. next-token prediction); benchmarks set their targets on it.
        noisy_ids: training ids whose labels were flipped on purpose (`--task-arg noise=...`),
            so a benchmark can check which of them a run flags; None when no label was flipped.
    """

    model: nn.Module
    train: Dataset
    val: Dataset
    loss: Callable[[Any, torch.Tensor], torch.Tensor] = cross_entropy
    logits: Callable[[Any], torch.Tensor] = logits_of
    num_classes: int | None = None
    metric: str = "accuracy"
    noisy_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")

    @property
    def num_samples(self) -> int:
        return len(self.train)  # type: ignore[arg-type]


@dataclass
class TaskArgs:
    """What every task factory receives; `extra` holds `--task-arg key=value` pairs."""

    num_samples: int = 50_000
    width: int = 64
    seed: int = 0
    extra: dict[str, str] = field(default_factory=dict)


def load_task(path: str) -> Callable[[TaskArgs], Task]:
    """Resolves a built-in task's short name or `package.module:function` to a task factory.

    Example:
        >>> load_task("tabular").__name__
        'make'
    """
    path = BUILTIN_TASKS.get(path, path)
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"task must be one of {', '.join(BUILTIN_TASKS)} or look like "
                         f"'package.module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import task module {module_name!r}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{module_name!r} has no callable {attr!r}")
    return factory


def iter_batches(
    dataset: Dataset, id_batches: Sequence[Sequence[int]] | Sequence[torch.Tensor],
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, tuple[Any, ...]]]:
    """Yields `(ids, (x, y, ...))` for each batch of sample ids, in order."""
    if isinstance(dataset, TensorDataset):
        for ids in id_batches:
            idx = torch.as_tensor(ids, dtype=torch.long)
            yield idx, tuple(t[idx] for t in dataset.tensors)
        return
    lists = [[int(i) for i in b] for b in id_batches]
    loader = DataLoader(dataset, batch_sampler=lists, num_workers=num_workers)
    for ids, batch in zip(lists, loader, strict=True):
        yield torch.as_tensor(ids, dtype=torch.long), tuple(batch)


def count_correct(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """Correct predictions and predictions made: one per element of `target`, so a model with
    per-position outputs is scored per position.

    The class dimension is the one `F.cross_entropy` uses (dim 1), or the last one when only
    that fits the target's shape.

    Example:
        >>> count_correct(torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]), torch.tensor([[0, 0]]))
        (1, 2)
    """
    if logits.ndim != target.ndim + 1 or logits.shape[0] != target.shape[0]:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not fit targets of shape "
                         f"{tuple(target.shape)}")
    if logits.shape[2:] == target.shape[1:]:
        pred = logits.argmax(dim=1)
    elif logits.shape[1:-1] == target.shape[1:]:
        pred = logits.argmax(dim=-1)
    else:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not fit targets of shape "
                         f"{tuple(target.shape)}")
    return int((pred == target).sum()), target.numel()


def check_extra(extra: dict[str, str], allowed: Sequence[str], task: str) -> None:
    """Refuses task arguments a task does not know, instead of silently ignoring a typo."""
    unknown = sorted(set(extra) - set(allowed))
    if unknown:
        known = ", ".join(allowed) or "none"
        raise ValueError(f"the {task} task does not take {', '.join(unknown)} (it takes: {known})")


def noise_share(extra: dict[str, str]) -> float:
    """The `noise` task argument: the share of training labels to flip (default 0)."""
    raw = extra.get("noise", "0")
    try:
        share = float(raw)
    except ValueError:
        raise ValueError(f"noise must be a number in [0, 1), got {raw!r}") from None
    if not 0.0 <= share < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {share}")
    return share


def flip_labels(y: np.ndarray, share: float, num_classes: int,
                seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Gives `share` of the labels, chosen by `seed`, another class drawn uniformly.

    Returns the new labels and the sorted ids that were flipped (None when share is 0).

    Example:
        >>> y, ids = flip_labels(np.zeros(10, dtype=np.int64), 0.2, 3, seed=0)
        >>> len(ids), bool((y[ids] != 0).all()), int((y != 0).sum())
        (2, True, 2)
    """
    if share == 0.0:
        return y, None
    rng = np.random.default_rng([seed, 0x5EED])
    ids = np.sort(rng.choice(len(y), size=round(share * len(y)), replace=False))
    flipped = y.copy()
    flipped[ids] = (y[ids] + rng.integers(1, num_classes, size=len(ids))) % num_classes
    return flipped, ids
