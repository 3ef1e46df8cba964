"""`hardbatch export` and `read_export`, against a real Redis server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from click.testing import CliRunner
from hardbatch.sampler.records import pack
from hardbatch.services.export import log_path_for, read_export
from hardbatch.services.materializer import Materializer
from hardbatch.services.store import LossStore

from hardbatch.cli import main


def fill(store: LossStore, run: str, size: int, batches: int, retain_log: bool,
         first_seq: int = 0) -> list:
    store.register_run(run, size, retain_log=retain_log)
    rng = np.random.default_rng(first_seq)
    sent = []
    for seq in range(first_seq, first_seq + batches):
        recs = pack(rng.integers(0, size, 50), rng.random(50).astype(np.float32),
                    rng.random(50) < 0.5, seq, 0, 0)
        store.ingest_records(run, 0, seq, recs)
        sent.append(recs)
    return sent


@pytest.mark.parametrize("retain_log", [True, False])
def test_export_roundtrip(redis_client: redis.Redis, redis_url: str, tmp_path: Path,
                          retain_log: bool) -> None:
    store = LossStore(redis_client)
    sent = fill(store, "r", 200, 10, retain_log)
    m = Materializer(store, "r")
    m.catch_up(30)
    m.snapshot()  # trims the log unless the run retains it
    sent += fill(store, "r", 200, 5, retain_log, first_seq=10)
    out = tmp_path / "r.parquet"
    res = CliRunner().invoke(main, ["export", "r", "--out", str(out), "--log",
                                    "--redis-url", redis_url])
    assert res.exit_code == 0, res.output
    assert "200 samples" in res.output
    back = read_export(out)
    assert back.run == "r" and back.meta["num_samples"] == 200
    m.catch_up(30)
    assert back.table.equals(m.table) and back.table.applied == 750
    assert log_path_for(out).exists() and back.log is not None
    if retain_log:
        assert back.meta["log"]["log_complete"] is True
        assert np.array_equal(back.log, np.concatenate(sent))
    else:
        assert back.meta["log"]["log_complete"] is False
        assert np.array_equal(back.log, np.concatenate(sent[10:]))
        assert "trimmed" in res.output


def test_export_errors(redis_client: redis.Redis, redis_url: str, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HARDBATCH_REDIS_URL", raising=False)
    runner = CliRunner()
    res = runner.invoke(main, ["export", "nope", "--out", str(tmp_path / "x.parquet"),
                               "--redis-url", redis_url])
    assert res.exit_code != 0 and "unknown run 'nope'" in res.output
    res = runner.invoke(main, ["export", "nope", "--out", str(tmp_path / "x.parquet")])
    assert res.exit_code != 0 and "no loss store configured" in res.output



    pq.write_table(pa.table({"a": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="not a hardbatch export"):
        read_export(tmp_path / "plain.parquet")


def test_runs_command(redis_client: redis.Redis, redis_url: str) -> None:
    fill(LossStore(redis_client), "shown", 10, 2, False)
    res = CliRunner().invoke(main, ["runs", "--redis-url", redis_url])
    assert res.exit_code == 0 and res.output.split() == ["shown"]
    res = CliRunner().invoke(main, ["runs", "shown", "--redis-url", redis_url])
    assert res.exit_code == 0 and '"records": 100' in res.output
    res = CliRunner().invoke(main, ["runs", "gone", "--redis-url", redis_url])
    assert res.exit_code != 0 and "unknown run" in res.output


def test_log_path_for() -> None:
    assert log_path_for("a/b.parquet") == Path("a/b.log.parquet")
    assert log_path_for("a/b") == Path("a/b.log.parquet")
