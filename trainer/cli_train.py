"""`hardbatch train`: a training run with the batch loss filter, with a summary at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from trainer.cli_options import build, options_from
from trainer.task import load_task
from trainer.train import RunResult, TrainConfig, fit


def print_summary(result: RunResult) -> None:
    print(f"\n{'epoch':>5}{'train loss':>12}{'val loss':>10}{'val acc':>9}{'kept':>7}"
          f"{'loss share':>12}{'time s':>8}")
    for e in result.epochs:
        print(f"{e['epoch']:>5}{e['train_loss']:>12.4f}{e['val_loss']:>10.4f}"
              f"{100 * e['val_accuracy']:>8.2f}%{e['samp_perc']:>7.2f}{e['loss_perc']:>12.3f}"
              f"{e['train_time_s']:>8.1f}")


@click.command("train")
@options_from(TrainConfig)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for metrics.json and plots [default: runs/<time>].")
def train_cmd(out: str | None, **values: object) -> None:
    """Train a task (built-in: MNIST-1D) with the batch loss filter."""
    config = build(TrainConfig, values)
    try:
        load_task(config.task)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--task") from e
    out_dir = Path(out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    result = fit(config)
    print_summary(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    from trainer.plots import plot_runs  # matplotlib is slow to import; only needed here

    name = "filtered" if config.filter else "plain"
    plots = plot_runs({name: result}, out_dir, stem="train")
    print(f"\nfinal accuracy {100 * result.final_accuracy:.2f}%, "
          f"training time {result.train_time_s:.1f}s")
    print(f"wrote {out_dir / 'metrics.json'} and {', '.join(p.name for p in plots)} in {out_dir}")
