"""A user task plugged in by dotted path: its model returns an output object, not a tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hardbatch.trainer.task import Task, TaskArgs
from torch import nn
from torch.utils.data import Dataset


@dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor


class ObjectModel(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, width), nn.ReLU())
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> Output:
        h = self.body(x)
        return Output(logits=self.head(h), hidden=h)


class ListDataset(Dataset):
    """A plain map-style dataset (not a TensorDataset), to exercise the DataLoader path."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def make(args: TaskArgs) -> Task:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.num_samples + 64, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    n = args.num_samples
    return Task(model=ObjectModel(args.width), train=ListDataset(x[:n], y[:n]),
                val=ListDataset(x[n:], y[n:]), num_classes=3)


def make_dict_model(args: TaskArgs) -> Task:
    task = make(args)

    class DictModel(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.inner(x).logits}

    task.model = DictModel(task.model)
    return task
