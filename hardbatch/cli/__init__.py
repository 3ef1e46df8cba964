"""The `hardbatch` command."""

from __future__ import annotations

import sys
from pathlib import Path

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
def bench(name: str, quick: bool, out: str) -> None:
    """Run benchmark NAME, print its table and write OUT/NAME.json."""
    bench_mod = _benchmarks()
    names = sorted(bench_mod.BENCHMARKS)  # type: ignore[attr-defined]
    if name not in names:
        raise click.BadParameter(f"{name!r} is not one of {', '.join(names)}", param_hint="NAME")
    bench_mod.run_benchmark(name, quick=quick, out=out)  # type: ignore[attr-defined]


from hardbatch.cli.serve import hardness_cmd, serve_cmd, top_cmd  # noqa: E402
from hardbatch.cli.store import export_cmd, runs_cmd  # noqa: E402
from hardbatch.cli.train import train_cmd  # noqa: E402

for command in (train_cmd, serve_cmd, hardness_cmd, top_cmd, runs_cmd, export_cmd):
    main.add_command(command)
