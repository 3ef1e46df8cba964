"""Exporting a run's hardness table (and raw loss log) to Parquet, and reading it back.

`FILE.parquet` holds one row per sample: sample_id, last_loss, ema, seen, kept, last_step.
With the log, `FILE.log.parquet` holds one row per loss record still in the store's log, in log
order. A run registered with `retain_log=True` keeps its whole log; otherwise snapshots trim it,
and the export says so (`log_complete` is false).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hardbatch.sampler.hardness import FIELD_DTYPES, FIELDS, HardnessTable
from hardbatch.sampler.records import RECORD_DTYPE
from hardbatch.services.materializer import Materializer
from hardbatch.services.store import LossStore

FORMAT = "hardbatch-export/1"
_META_KEY = b"hardbatch"


@dataclass(frozen=True)
class ExportedRun:
    """A run read back from an export.

    Attributes:
        run: run name.
        meta: what the export recorded (num_samples, ema_decay, consumed_entries, ...).
        table: the hardness table.
        log: the loss records (RECORD_DTYPE, log order), or None if not exported.
    """

    run: str
    meta: dict[str, Any]
    table: HardnessTable
    log: np.ndarray | None


def log_path_for(path: str | Path) -> Path:
    """Where the log goes beside a table export: x.parquet -> x.log.parquet."""
    p = Path(path)
    return p.with_name(p.name[: -len(".parquet")] + ".log.parquet") if p.name.endswith(
        ".parquet") else p.with_name(p.name + ".log.parquet")


def _with_meta(table: pa.Table, meta: dict[str, Any]) -> pa.Table:
    return table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})


def export_run(store: LossStore, run: str, out: str | Path, *, log: bool = False,
               timeout_s: float = 60.0) -> dict[str, Any]:
    """Writes the run's current hardness table (snapshot + log replayed) to `out`.

    Args:
        store: the loss store.
        run: a registered run (UnknownRunError otherwise).
        out: the table's Parquet file.
        log: also write the raw log to `log_path_for(out)`.
        timeout_s: how long to spend replaying the log.

    Returns:
        A summary: paths, rows, and the metadata written.
    """
    info = store.run_info(run)
    m = Materializer(store, run, publish=False)
    m.catch_up(timeout_s)
    stats = m.stats()
    meta: dict[str, Any] = {
        "format": FORMAT,
        "run": run,
        "num_samples": info.num_samples,
        "ema_decay": info.ema_decay,
        "consumed_entries": stats.consumed_entries,
        "applied_records": stats.applied_records,
        "rejected_out_of_range": stats.rejected_out_of_range,
        "rejected_nonfinite": stats.rejected_nonfinite,
        "exported_at": time.time(),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with m.view() as t:
        columns = {"sample_id": pa.array(np.arange(t.size, dtype=np.int64))}
        columns |= {f: pa.array(getattr(t, f).copy()) for f in FIELDS}
    pq.write_table(_with_meta(pa.table(columns), meta), out)
    summary: dict[str, Any] = {"table": str(out), "rows": info.num_samples, "meta": meta}
    if log:
        first = store.first_log_index(run)
        records = store.log_records(run)
        # Complete when nothing was trimmed: the oldest entry left is the first ever appended.
        complete = first == 1 or (first is None and stats.consumed_entries == 0)
        log_meta = meta | {"first_entry_index": first, "log_complete": complete}
        cols = {name: pa.array(np.ascontiguousarray(records[name])) for name in
                RECORD_DTYPE.names or ()}
        lp = log_path_for(out)
        pq.write_table(_with_meta(pa.table(cols), log_meta), lp)
        summary |= {"log": str(lp), "log_rows": len(records),
                    "log_complete": log_meta["log_complete"]}
    return summary


def read_export(path: str | Path) -> ExportedRun:
    """Loads an export written by `export_run` (and its log file, if there is one).

    Raises:
        ValueError: the file is not a hardbatch export.
    """
    path = Path(path)
    pt = pq.read_table(path)
    raw = (pt.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a hardbatch export (no '{_META_KEY.decode()}' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported export format {meta.get('format')!r}")
    arrays = {f: pt.column(f).to_numpy().astype(FIELD_DTYPES[f]) for f in FIELDS}
    table = HardnessTable.from_arrays(arrays, meta["ema_decay"], meta["applied_records"])
    log = None
    lp = log_path_for(path)
    if lp.exists():
        lt = pq.read_table(lp)
        log = np.empty(lt.num_rows, dtype=RECORD_DTYPE)
        for name in RECORD_DTYPE.names or ():
            log[name] = lt.column(name).to_numpy()
        meta["log"] = json.loads((lt.schema.metadata or {})[_META_KEY])
    return ExportedRun(run=meta["run"], meta=meta, table=table, log=log)
