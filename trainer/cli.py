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


# The other commands live beside the code they drive.
from services.cli_service import hardness_cmd, serve_cmd, top_cmd  # noqa: E402
from services.cli_store import export_cmd, runs_cmd  # noqa: E402
from trainer.cli_train import train_cmd  # noqa: E402

for command in (train_cmd, serve_cmd, hardness_cmd, top_cmd, runs_cmd, export_cmd):
    main.add_command(command)
