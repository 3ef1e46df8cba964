"""Tasks: what to train, on what data, with which per-sample loss.

A task is any function `make(args: TaskArgs) -> Task`, named by a dotted path
`package.module:function`, so users plug in their own model and data without editing hardbatch.
The built-in tasks also answer to short names: `mnist1d`, `tabular`, `sequence` and `images`.
Sample ids are the integer positions 0..N-1 of the training dataset: they must stay stable for
the whole run, because the loss store and the sampler address samples by them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

# Short names of the built-in tasks, for `--task`.
BUILTIN_TASKS = {
    "mnist1d": "hardbatch.trainer.mnist1d_task:make",
    "tabular": "hardbatch.trainer.tabular_task:make",
    "sequence": "hardbatch.trainer.sequence_task:make",
    "images": "hardbatch.trainer.images_task:make",
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
        optimizer: `parameters -> optimizer`, the task's own choice (used unless
            `--optimizer` names one); None: AdamW with `--lr` and `--weight-decay`.
        scheduler: `(optimizer, total_steps) -> LR scheduler` stepped once per batch (used
            unless `--schedule` names one); None: OneCycle peaking at `--lr`.
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
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None
    scheduler: Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler] \
        | None = None
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


class IdDataset(Dataset):
    """`dataset` with each item paired with its index: `(id, item)`, so the sample ids travel
    with their batch through any `DataLoader` (worker processes, Ray's device transfer).

    A `TensorDataset` is fetched a whole batch at a time (`__getitems__`: one gather per tensor
    instead of one item per sample); `IdCollate` passes such a batch through. Id -1 marks a
    slot the plan does not train (`plan_source.Round`): it is dropped, never loaded.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.dataset[i]

    def __getitems__(self, ids: list[int]) -> Any:
        ids = [i for i in ids if i >= 0]
        if isinstance(self.dataset, TensorDataset):
            idx = torch.as_tensor(ids, dtype=torch.long)
            return _Batch((idx, tuple(t[idx] for t in self.dataset.tensors)))
        return [(i, self.dataset[i]) for i in ids]


class _Batch(tuple):
    """A batch `IdDataset` already assembled (so collation leaves it alone)."""


class IdCollate:
    """Collates `(id, item)` pairs into `(ids, batch)`; `collate_fn` builds the batch from the
    items (default: torch's `default_collate`). A class, so worker processes can pickle it."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, pairs: Any) -> tuple[torch.Tensor, Any]:
        if isinstance(pairs, _Batch):
            ids, batch = pairs
            return ids, batch
        ids = torch.as_tensor([i for i, _ in pairs], dtype=torch.long)
        return ids, self.collate_fn([item for _, item in pairs])


def iter_batches(
    dataset: Dataset, id_batches: Iterable[Sequence[int]] | Iterable[torch.Tensor],
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, Any]]:
    """Yields `(ids, (x, y, ...))` for each batch of sample ids, in order.

    Lazy: a batch's ids are read from `id_batches` only when it is loaded (a few batches ahead
    with `num_workers`), so a plan that acts on iteration (`RoundPlans` asks for the next round
    at 90% of this one) sees the training's real progress.
    """
    lists = ([int(i) for i in b] for b in id_batches)
    loader = DataLoader(IdDataset(dataset), batch_sampler=lists,
                        num_workers=num_workers, collate_fn=IdCollate())
    for ids, batch in loader:
        yield ids, tuple(batch)


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


def generated_task(args: TaskArgs, name: str, arrays: Callable[[int, int, int], dict[str, Any]],
                   model: Callable[[dict[str, Any]], nn.Module], classes: int) -> Task:
    """A task over generated arrays (`x`, `y`, `x_val`, `y_val`) with the built-in tasks'
    `data_seed` and `noise` arguments: up to 10,000 validation rows, labels flipped on request,
    the model built after seeding with the run's seed."""
    check_extra(args.extra, ("data_seed", "noise"), name)
    if args.num_samples < 1 or args.width < 1:
        raise ValueError(f"num_samples and width must be >= 1, got {args.num_samples}, "
                         f"{args.width}")
    num_val = min(10_000, max(args.num_samples // 5, 100))
    data_seed = int(args.extra.get("data_seed", 42))
    a = arrays(args.num_samples, num_val, data_seed)
    y, noisy = flip_labels(a["y"], noise_share(args.extra), classes, seed=data_seed)
    torch.manual_seed(args.seed)
    return Task(
        model=model(a),
        train=TensorDataset(torch.from_numpy(a["x"]), torch.from_numpy(y)),
        val=TensorDataset(torch.from_numpy(a["x_val"]), torch.from_numpy(a["y_val"])),
        num_classes=classes, noisy_ids=noisy,
    )
