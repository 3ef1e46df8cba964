"""The `hardbatch` command."""

from __future__ import annotations

import click

from benchmarks import BENCHMARKS, run_benchmark


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """hardbatch: train on the examples that matter."""


@main.command()
@click.argument("name", type=click.Choice(sorted(BENCHMARKS)))
@click.option("--quick", is_flag=True, help="Small sizes for a smoke run (seconds, not minutes).")
@click.option("--out", type=click.Path(file_okay=False), default="bench-out", show_default=True,
              help="Folder for NAME.json and plots.")
def bench(name: str, quick: bool, out: str) -> None:
    """Run benchmark NAME, print its table and write OUT/NAME.json."""
    run_benchmark(name, quick=quick, out=out)


# Commands from other modules are registered here, one line each.
