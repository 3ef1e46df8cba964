"""Tasks: what to train, on what data, with which per-sample loss.

A task is any function `make(args: TaskArgs) -> Task`, named by a dotted path
`package.module:function`, so users plug in their own model and data without editing hardbatch.
Sample ids are the integer positions 0..N-1 of the training dataset: they must stay stable for
the whole run, because the loss store and the sampler address samples by them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


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
        logits: `model output -> logits` for accuracy.
        num_classes: number of classes, for reporting.
    """

    model: nn.Module
    train: Dataset
    val: Dataset
    loss: Callable[[Any, torch.Tensor], torch.Tensor] = cross_entropy
    logits: Callable[[Any], torch.Tensor] = logits_of
    num_classes: int | None = None

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
    """Resolves `package.module:function` to a task factory."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"task must look like 'package.module:function', got {path!r}")
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
