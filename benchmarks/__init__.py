"""Benchmarks, run as `hardbatch bench NAME [--quick] --out DIR`.

Each module here has `run(quick: bool, out: pathlib.Path) -> dict`: it prints its table, writes
`out/NAME.json` (and any plots) and returns what it wrote.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

# NAME on the command line -> module under benchmarks/.
BENCHMARKS: dict[str, str] = {
    "filter": "benchmarks.filter",
    "distributed": "benchmarks.distributed",
    "ingest": "benchmarks.ingest",
    "stream-overhead": "benchmarks.stream_overhead",
    "store-memory": "benchmarks.store_memory",
    "plan": "benchmarks.plan",
    "lookup-load": "benchmarks.lookup_load",
}


def run_benchmark(name: str, quick: bool, out: str | Path) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(BENCHMARKS[name])
    result: dict[str, Any] = module.run(quick=quick, out=out)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out / (name + '.json')}")
    return result
