"""`hardbatch train`: a run with the batch loss filter, on Ray Train with the sampler service
and the loss store (started here unless given), or in this process with `--local`."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import click

from hardbatch.cli.options import build, options_from
from hardbatch.trainer.distributed import JobConfig
from hardbatch.trainer.task import load_task
from hardbatch.trainer.train import RunResult, fit


def print_summary(result: RunResult) -> None:
    from hardbatch.trainer.streaming import fixed

    print(f"\n{'epoch':>5}{'train loss':>12}{'val loss':>10}{'val acc':>9}{'scored':>8}"
          f"{'kept':>7}{'loss share':>12}{'filtered':>10}{'time s':>8}")
    for e in result.epochs:
        # scored: share of the epoch's batch slots scored (below 1: an adaptive plan size).
        # filtered: share of the epoch's steps the filter ran on (the cost model's choice);
        # runs resumed from before it was recorded have none.
        filtered = f"{e['filter_steps']:>10.2f}" if "filter_steps" in e else f"{'-':>10}"
        print(f"{e['epoch']:>5}{fixed(e['train_loss'], 12)}{fixed(e['val_loss'], 10)}"
              f"{100 * e['val_accuracy']:>8.2f}%{e.get('scored_perc', 1.0):>8.2f}"
              f"{e['samp_perc']:>7.2f}{e['loss_perc']:>12.3f}"
              f"{filtered}{e['train_time_s']:>8.1f}")


def print_hardest(run: str, hardest: list[dict[str, Any]]) -> None:
    from hardbatch.trainer.streaming import hardest_table

    print(f"\nhardest samples of run {run} (moving average of their loss):")
    print(hardest_table(hardest))


@click.command("train")
@options_from(JobConfig)
@click.option("--local", is_flag=True,
              help="Train in this process, without Ray or the service; losses still go to the "
                   "store (--redis, or an embedded Redis).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for metrics.json and plots [default: runs/<time>].")
def train_cmd(local: bool, out: str | None, **values: object) -> None:
    """Train a task (built-in: MNIST-1D) with the batch loss filter.

    With no addresses this starts a Ray local cluster, an embedded Redis loss store and the
    sampler service, trains on WORKERS Ray Train workers and stops it all at the end.
    """
    job = build(JobConfig, values)
    try:
        load_task(job.task)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--task") from e
    out_dir = Path(out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    hardest = None
    if local:
        from hardbatch.trainer.streaming import delivery_line, loss_stream
        from hardbatch.trainer.task import TaskArgs

        run = job.run or f"local-{time.strftime('%Y%m%d-%H%M%S')}"
        task = load_task(job.task)(TaskArgs(job.num_samples, job.width, job.seed,
                                            dict(job.task_args)))
        with loss_stream(run, task.num_samples, job.redis or None) as stream:
            result = fit(job.train_config(), reporter=stream.reporter, task=task)
            summary = stream.finish()
        print(delivery_line(summary))
        hardest = (run, [{**h, "id": h["sample_id"]} for h in summary.hardest])
    else:
        from hardbatch.trainer.launch import launch

        logging.basicConfig(level=logging.WARNING)
        done = launch(job)
        result, hardest = done.result, (done.run, done.hardest)
    print_summary(result)
    if hardest:
        print_hardest(*hardest)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    from hardbatch.trainer.plots import plot_runs  # matplotlib is slow to import; only needed here

    plots = plot_runs({"filtered" if job.filter else "plain": result}, out_dir, stem="train")
    print(f"\nfinal accuracy {100 * result.final_accuracy:.2f}%, "
          f"training time {result.train_time_s:.1f}s")
    print(f"wrote {out_dir / 'metrics.json'} and {', '.join(p.name for p in plots)} in {out_dir}")


