"""Hugging Face `transformers.Trainer` on Ray Train with hardbatch: 2 workers, a tiny model.

    python examples/transformers_ray.py [--epochs 3] [--workers 2]

The model is a `PreTrainedModel` built in code from a `PretrainedConfig` (a bag of token
embeddings and a linear head; no downloaded weights or tokenizer), the data synthetic token
sequences whose class is marked by one token, with 10% of the labels flipped. The driver side
is one `hardbatch.Driver`; each Ray worker runs a `HardbatchTrainer` made ready by Ray's
`prepare_trainer` and `RayTrainReportCallback`. Prints the final evaluation accuracy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

import hardbatch

NUM_TRAIN, NUM_VAL, VOCAB, LENGTH, CLASSES = 4000, 1000, 64, 16, 4


class TinyConfig(PretrainedConfig):
    model_type = "hardbatch-tiny"

    def __init__(self, vocab_size: int = VOCAB, hidden_size: int = 32, num_labels: int = CLASSES,
                 **kwargs: Any) -> None:
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(num_labels=num_labels, **kwargs)


class TinyClassifier(PreTrainedModel):
    """Mean of token embeddings (masked), a hidden layer and a classifier head."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(),
                                  nn.Linear(config.hidden_size, config.num_labels))
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        mask = (attention_mask if attention_mask is not None
                else torch.ones_like(input_ids)).unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        logits = self.head(pooled)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def token_data(n: int, seed: int, noise: float = 0.1) -> list[dict[str, torch.Tensor]]:
    """Sequences of random tokens; the class is the one marker token (VOCAB-CLASSES+c) placed
    at a random position; `noise` of the labels are random."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - CLASSES, (n, LENGTH), generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    ids[torch.arange(n), torch.randint(0, LENGTH, (n,), generator=g)] = VOCAB - CLASSES + y
    flip = torch.rand(n, generator=g) < noise
    y = torch.where(flip, torch.randint(0, CLASSES, (n,), generator=g), y)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long),
             "labels": y[i]} for i in range(n)]


def accuracy(pred: Any) -> dict[str, float]:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def train_loop(config: dict[str, Any]) -> None:
    """Each Ray Train worker: a HardbatchTrainer, prepared for Ray as any Trainer would be."""
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import TrainingArguments

    from hardbatch.integrations.transformers import HardbatchTrainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, num_train_epochs=config["epochs"], learning_rate=1e-2,
            per_device_train_batch_size=config["batch_size"], per_device_eval_batch_size=500,
            eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch",
            save_total_limit=1, report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
        trainer = HardbatchTrainer(
            model=TinyClassifier(TinyConfig()), args=args, train_dataset=token_data(NUM_TRAIN, 0),
            eval_dataset=token_data(NUM_VAL, 1, noise=0.0), compute_metrics=accuracy,
            hardbatch=config["hardbatch"])
        trainer.add_callback(RayTrainReportCallback())
        trainer = prepare_trainer(trainer)
        trainer.train()


def main(argv: list[str] | None = None) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)

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
    acc = float(result.metrics["eval_accuracy"])
    print(f"kept {result.metrics['hardbatch_kept']:.2f} of the scored examples in the last "
          f"epoch; the store holds {info.get('records', '?')} loss records")
    print(f"final eval_accuracy {acc:.3f}")
    return acc


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    main()
