"""The `hardbatch` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

# Benchmarks are not library code: they live in the checkout's benchmarks/ folder, not in the
# wheel, and `hardbatch bench` finds them there (the working directory first, then the source
# tree of an editable install).
_CHECKOUTS = (Path.cwd(), Path(__file__).resolve().parents[2])


def _benchmarks() -> object:
    for root in _CHECKOUTS:
        if (root / "benchmarks" / "__init__.py").is_file() and (root / "sampler").is_dir():
            sys.path.insert(0, str(root))
            import benchmarks

            return benchmarks
    raise click.UsageError(
        "hardbatch bench runs from a source checkout (its benchmarks/ folder); "
        "cd into one or install hardbatch in editable mode")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """hardbatch: train on the examples that matter."""


@main.command()
@click.argument("name")
@click.option("--quick", is_flag=True, help="Small sizes for a smoke run (seconds, not minutes).")
@click.option("--out", type=click.Path(file_okay=False), default="bench-out", show_default=True,
              help="Folder for NAME.json and plots.")
@click.option("--task", default=None,
              help="frontier: task to train, mnist1d, tabular, sequence, images or "
                   "package.module:function "
                   "[default: mnist1d].")
@click.option("--task-arg", "task_args", multiple=True, metavar="KEY=VALUE",
              help="frontier: task argument, e.g. noise=0.2 (repeatable).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="frontier: 1 trains in this process, more on Ray Train workers [default: 1].")
@click.option("--seeds", type=click.IntRange(min=1), default=None,
              help="frontier: seeds per config [default: 3, --quick 2].")
@click.option("--threads", type=click.IntRange(min=0), default=None,
              help="frontier: torch threads per training process (0: torch's default) "
                   "[default: 1].")
@click.option("--ablations", default=None, metavar="A,B",
              help="frontier: ablation arms to train, comma-separated, from uniform, "
                   "half, half_weighted, half_uniform, half_uncertain, cost_model, no_gate, "
                   "no_guard, steps40, steps40_uniform, fixed_size, unpacked, no_filter, no_curve, "
                   "curve "
                   "('' for none) "
                   "[default: all].")
@click.option("--budgets", default=None, metavar="N,M",
              help="frontier: passes over the data to train each config for, comma-separated "
                   "[default: 2,4,7,12,24].")
@click.option("--lrs", default=None, metavar="F,G",
              help="frontier: learning rates as factors of the default, comma-separated, for "
                   "plain and hardbatch alike [default: 0.5,1,2].")
def bench(name: str, quick: bool, out: str, task: str | None, task_args: tuple[str, ...],
          workers: int | None, seeds: int | None, threads: int | None,
          ablations: str | None, budgets: str | None, lrs: str | None) -> None:
    """Run benchmark NAME, print its table and write OUT/NAME.json."""
    bench_mod = _benchmarks()
    names = sorted(bench_mod.BENCHMARKS)  # type: ignore[attr-defined]
    if name not in names:
        raise click.BadParameter(f"{name!r} is not one of {', '.join(names)}", param_hint="NAME")
    pairs = [a.partition("=") for a in task_args]
    if any(not sep or not k for k, sep, _ in pairs):
        raise click.BadParameter(f"expected KEY=VALUE, got {task_args}", param_hint="--task-arg")
    given = {"task": task, "task_args": {k: v for k, _, v in pairs} or None, "workers": workers,
             "seeds": seeds, "threads": threads,
             "ablations": None if ablations is None else [a for a in ablations.split(",") if a],
             "budgets": _numbers(budgets, int, "--budgets"),
             "lr_factors": _numbers(lrs, float, "--lrs")}
    options = {k: v for k, v in given.items() if v is not None}
    try:
        if task is not None:
            from hardbatch.trainer.task import load_task

            load_task(task)
        bench_mod.run_benchmark(name, quick=quick, out=out, **options)  # type: ignore[attr-defined]
    except ValueError as e:
        raise click.UsageError(str(e)) from e


def _numbers(text: str | None, kind: type, hint: str) -> list[Any] | None:
    if text is None:
        return None
    try:
        return [kind(x) for x in text.split(",") if x.strip()] or None
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {text!r}",
                                 param_hint=hint) from None


from hardbatch.cli.serve import hardness_cmd, serve_cmd, top_cmd  # noqa: E402
from hardbatch.cli.store import export_cmd, runs_cmd  # noqa: E402
from hardbatch.cli.train import train_cmd  # noqa: E402

for command in (train_cmd, serve_cmd, hardness_cmd, top_cmd, runs_cmd, export_cmd):
    main.add_command(command)
