"""Benchmarks, run as `hardbatch bench NAME [--quick] --out DIR`.

Each module here has `run(quick: bool, out: pathlib.Path, **options) -> dict`: it prints its
table, writes its plots under `out` and returns what `run_benchmark` writes to `out/NAME.json`.
Options (`--task`, `--workers`, ...) go only to benchmarks whose `run` takes them.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

# NAME on the command line -> module under benchmarks/.
BENCHMARKS: dict[str, str] = {
    "frontier": "benchmarks.frontier",
    "ingest": "benchmarks.ingest",
    "stream-overhead": "benchmarks.stream_overhead",
    "store-memory": "benchmarks.store_memory",
    "plan": "benchmarks.plan",
    "lookup-load": "benchmarks.lookup_load",
    "faults": "benchmarks.faults",
}


def options_of(name: str) -> list[str]:
    """The options benchmark `name` takes besides quick and out."""
    params = inspect.signature(importlib.import_module(BENCHMARKS[name]).run).parameters
    return [p for p in params if p not in ("quick", "out")]


def run_benchmark(name: str, quick: bool, out: str | Path, **options: Any) -> dict[str, Any]:
    """Runs benchmark `name` and writes `out/NAME.json`.

    Raises:
        ValueError: an option the benchmark does not take.
    """
    unknown = sorted(set(options) - set(options_of(name)))
    if unknown:
        takes = ", ".join(options_of(name)) or "none"
        raise ValueError(f"benchmark {name} does not take {', '.join(unknown)} (it takes: {takes})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(BENCHMARKS[name])
    result: dict[str, Any] = module.run(quick=quick, out=out, **options)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out / (name + '.json')}")
    return result
