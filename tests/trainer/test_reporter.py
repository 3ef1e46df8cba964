"""The loss reporter against real Redis servers, including ones that die and come back."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from hardbatch.sampler.hardness import HardnessTable, split_valid
from hardbatch.sampler.records import pack
from hardbatch.services.materializer import Materializer
from hardbatch.services.redis_server import EmbeddedRedis
from hardbatch.services.store import LossStore
from hardbatch.trainer.reporter import LossReporter, ReporterError
from hardbatch.trainer.spill import read_spill, spill_folder
from hardbatch.trainer.train import TrainConfig, fit


class Recording:
    """Passes reports on and keeps a copy of each, to build the expected table."""

    def __init__(self, inner: LossReporter, on_report=None) -> None:
        self.inner = inner
        self.batches: list[np.ndarray] = []
        self.on_report = on_report

    def report(self, ids, losses, kept, step, epoch) -> None:
        self.batches.append(pack(ids, losses, kept, step, epoch, self.inner.rank))
        self.inner.report(ids, losses, kept, step, epoch)
        if self.on_report:
            self.on_report(len(self.batches))


def reference_table(batches: list[np.ndarray], size: int) -> HardnessTable:
    table = HardnessTable(size)
    for recs in batches:
        ids = recs["sample_id"].astype(np.int64)
        mask, _ = split_valid(ids, recs["loss"].copy(), size)
        sel = slice(None) if mask is None else mask
        table.apply(ids[sel], recs["loss"][sel], recs["kept"][sel].astype(bool), recs["step"][sel],
                    recs["epoch"][sel])
    return table


def random_batch(rng: np.random.Generator, size: int, n: int) -> tuple[np.ndarray, ...]:
    return (rng.integers(0, size, n), rng.gamma(2, 1, n).astype(np.float32), rng.random(n) < 0.3)


@pytest.fixture
def spill_dir(tmp_path: Path) -> Path:
    return tmp_path / "spill"


@pytest.fixture
def restartable() -> Iterator[EmbeddedRedis]:
    """A server of the test's own, with an fsync-always AOF so a SIGKILL loses nothing."""
    directory = tempfile.mkdtemp(prefix="hbr-")  # short: unix socket paths are limited
    server = EmbeddedRedis(directory, appendonly=True, appendfsync="always")
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


def materialize(url: str, run: str) -> Materializer:
    m = Materializer(LossStore.from_url(url), run, publish=False)
    m.catch_up(60)
    return m


def test_delivers_everything_once(redis_client: redis.Redis, redis_url: str,
                                  spill_dir: Path) -> None:
    rng = np.random.default_rng(0)
    rep = LossReporter(redis_url, "r", rank=2, num_samples=1000, spill_dir=spill_dir)
    rec = Recording(rep)
    for step in range(50):
        ids, losses, kept = random_batch(rng, 1000, 64)
        if step % 2:  # CPU tensors work as well as numpy arrays
            rec.report(torch.from_numpy(ids), torch.from_numpy(losses), torch.from_numpy(kept),
                       step, 0)
        else:
            rec.report(ids, losses, kept, step, 0)
    report = rep.close(30)
    assert report.ok and report.error is None
    assert report.reported_records == report.delivered_records == 50 * 64
    assert report.spilled_records == 0 and report.spill_path is None
    m = materialize(redis_url, "r")
    assert m.table.equals(reference_table(rec.batches, 1000))
    info = LossStore(redis_client).run_info("r")
    assert info.records == 50 * 64 and list(info.ranks) == [2]
    assert not list(spill_dir.iterdir()), "a clean close leaves not even the run's folder"


def test_report_never_waits_for_a_slow_or_dead_redis(spill_dir: Path) -> None:
    # Nothing listens on this socket: every send fails, report() must still return at once.
    rep = LossReporter("unix:///tmp/hb-nothing-here.sock", "r", num_samples=100,
                       spill_dir=spill_dir, max_buffer_records=1000, max_batch_records=100)
    ids, losses, kept = np.arange(100), np.ones(100, np.float32), np.ones(100, bool)
    worst = 0.0
    for step in range(100):
        t0 = time.perf_counter()
        rep.report(ids, losses, kept, step, 0)
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.5, worst  # far below the 1 s connect timeout it must not wait for
    report = rep.close(0.2)
    assert not report.ok and report.pending_records == 100 * 100
    assert report.spill_path and "ConnectionError" in (report.error or "")
    frames = read_spill(report.spill_path)
    assert sum(len(r) for _, r in frames) == 100 * 100
    seqs = [s for s, _ in frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_buffers_and_spills_until_redis_appears_then_delivers_once(
        restartable: EmbeddedRedis, spill_dir: Path) -> None:
    rng = np.random.default_rng(1)
    rep = LossReporter(restartable.url, "r", num_samples=500, spill_dir=spill_dir,
                       max_buffer_records=2000, max_batch_records=500)
    rec = Recording(rep)
    for step in range(60):
        rec.report(*random_batch(rng, 500, 100), step, 0)
    # The sender thread spills, within one retry interval (never the training thread).
    deadline = time.monotonic() + 5
    while not list(spill_dir.rglob("*.spill")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(spill_dir.rglob("*.spill")), "past the bound the records go to disk"
    restartable.start()
    for step in range(60, 80):
        rec.report(*random_batch(rng, 500, 100), step, 1)
    report = rep.close(30)
    assert report.ok, report
    assert report.delivered_records == 80 * 100 and report.spilled_records > 0
    assert materialize(restartable.url, "r").table.equals(reference_table(rec.batches, 500))
    assert not list(spill_dir.rglob("*.spill"))


def test_redis_killed_and_restarted_mid_stream(restartable: EmbeddedRedis,
                                               spill_dir: Path) -> None:
    restartable.start()
    url = restartable.url
    store = LossStore.from_url(url)
    store.register_run("r", 2000)
    consumer = Materializer(LossStore.from_url(url), "r", snapshot_interval_s=0.3)
    consumer.start(block_ms=50)
    rng = np.random.default_rng(2)
    rep = LossReporter(url, "r", rank=1, spill_dir=spill_dir, max_buffer_records=3000,
                       max_batch_records=400)
    rec = Recording(rep)
    for step in range(300):
        ids, losses, kept = random_batch(rng, 2000, 100)
        if step % 37 == 5:
            losses[0] = np.nan  # counted as a rejection, never applied
        rec.report(ids, losses, kept, step, step // 100)
        if step == 100:
            restartable.kill()
        if step == 200:
            restartable.start()
        time.sleep(0.002)
    report = rep.close(60)
    assert report.ok, report
    assert report.delivered_records == report.reported_records == 300 * 100
    assert report.spilled_records > 0
    deadline = time.monotonic() + 30
    while consumer.stats().consumed_records < 300 * 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    consumer.stop()
    expected = reference_table(rec.batches, 2000)
    assert consumer.table.equals(expected)
    assert materialize(url, "r").table.equals(expected)  # snapshot + replay agrees
    info = store.run_info("r")
    assert info.records == 300 * 100
    assert info.rejected_nonfinite == sum(1 for s in range(300) if s % 37 == 5)


def test_training_run_survives_redis_restart(restartable: EmbeddedRedis, spill_dir: Path) -> None:
    restartable.start()
    config = TrainConfig(num_samples=2000, epochs=2, batch_size=64, width=16, progress=False,
                         threads=1)
    rep = LossReporter(restartable.url, "train", num_samples=2000, spill_dir=spill_dir,
                       max_buffer_records=640, max_batch_records=128)

    def chaos(n: int) -> None:
        if n == 10:
            restartable.kill()
        elif n == 35:
            restartable.start()

    rec = Recording(rep, on_report=chaos)
    result = fit(config, reporter=rec)
    report = rep.close(60)
    assert len(result.epochs) == 2
    assert report.ok, report
    scored = sum(len(b) for b in rec.batches)
    assert scored == 2 * 2000 == report.delivered_records
    m = materialize(restartable.url, "train")
    assert m.table.equals(reference_table(rec.batches, 2000))
    assert int(m.table.seen.sum()) == 2 * 2000 and (m.table.seen == 2).all()


def test_left_over_spill_is_sent_by_the_next_reporter_without_duplicates(
        redis_client: redis.Redis, redis_url: str, spill_dir: Path) -> None:
    store = LossStore(redis_client)
    store.register_run("r", 300)
    rng = np.random.default_rng(3)
    dead = LossReporter("unix:///tmp/hb-nothing-here.sock", "r", spill_dir=spill_dir,
                        max_batch_records=50, seq_start=1000)
    rec = Recording(dead)
    for step in range(10):
        rec.report(*random_batch(rng, 300, 50), step, 0)
    left = dead.close(0.1)
    assert left.pending_records == 500 and left.spill_path
    # Pretend the first 4 of those batches did reach the store before the worker died.
    for seq, records in read_spill(left.spill_path)[:4]:
        assert store.ingest_records("r", 0, seq, records)
    nxt = LossReporter(redis_url, "r", spill_dir=spill_dir, seq_start=5000)
    for step in range(10, 15):
        ids, losses, kept = random_batch(rng, 300, 50)
        rec.batches.append(pack(ids, losses, kept, step, 0, 0))
        nxt.report(ids, losses, kept, step, 0)
    report = nxt.close(30)
    assert report.ok and report.duplicate_batches == 4
    assert report.delivered_records == 500 + 250
    assert materialize(redis_url, "r").table.equals(reference_table(rec.batches, 300))
    assert store.run_info("r").records == 750
    assert not list(spill_dir.rglob("*.spill"))


def test_bad_input_is_refused_in_the_caller(redis_url: str, redis_client: redis.Redis,
                                            spill_dir: Path) -> None:
    rep = LossReporter(redis_url, "r", num_samples=10, spill_dir=spill_dir)
    with pytest.raises(ValueError, match="mismatched"):
        rep.report([1, 2], [1.0], [True, True], 0, 0)
    with pytest.raises(ValueError, match="integers"):
        rep.report([1.5], [1.0], [True], 0, 0)
    with pytest.raises(ValueError, match="step"):
        rep.report([1], [1.0], [True], -5, 0)
    with pytest.raises(ValueError, match="epoch"):
        rep.report([1], [1.0], [True], 0, 2**16)
    rep.report([], [], [], 0, 0)
    # Ids no record can hold are dropped by the sender (it cannot raise into the training
    # step) and counted; one in range for the wire but not for this run is the store's to count.
    rep.report(np.array([1, 50, -1, 2**40]), [1.0, 2.0, 3.0, 4.0], [True] * 4, 1, 0)
    report = rep.close(30)
    assert report.ok and report.reported_records == 4
    assert report.invalid_records == 2 and report.delivered_records == 2
    m = materialize(redis_url, "r")
    assert m.stats().rejected_out_of_range == 1 and m.table.seen.sum() == 1
    with pytest.raises(ReporterError, match="after close"):
        rep.report([1], [1.0], [True], 2, 0)


def test_unknown_run_and_size_mismatch_stop_the_reporter(redis_url: str,
                                                         redis_client: redis.Redis,
                                                         spill_dir: Path) -> None:
    rep = LossReporter(redis_url, "never-registered", spill_dir=spill_dir)
    queued = 1
    try:
        rep.report([1], [1.0], [True], 0, 0)
    except ReporterError:  # the sender found out first
        queued = 0
    report = rep.flush(10)
    assert report.pending_records == queued and "unknown run" in (report.error or "")
    with pytest.raises(ReporterError, match="unknown run"):
        rep.report([1], [1.0], [True], 1, 0)
    rep.close(1)

    LossStore(redis_client).register_run("sized", 100)
    rep = LossReporter(redis_url, "sized", num_samples=200, spill_dir=spill_dir)
    try:
        rep.report([1], [1.0], [True], 0, 0)
        queued = 1
    except ReporterError as e:  # the sender found out first
        assert "num_samples=100" in str(e)
        queued = 0
    report = rep.close(10)
    assert report.pending_records == queued and "num_samples=100" in (report.error or "")
    assert LossStore(redis_client).run_info("sized").records == 0


@pytest.mark.parametrize("kwargs", [{"rank": -1}, {"rank": 2**16}, {"max_batch_records": 0},
                                    {"max_buffer_records": 10, "max_batch_records": 20},
                                    {"num_samples": 0}])
def test_bad_arguments(redis_url: str, kwargs) -> None:
    with pytest.raises(ValueError):
        LossReporter(redis_url, "r", start=False, **kwargs)


def test_loss_stream_demo_with_embedded_redis(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    from hardbatch.trainer.streaming import format_hardest, loss_stream

    monkeypatch.delenv("HARDBATCH_REDIS_URL", raising=False)
    config = TrainConfig(num_samples=1000, epochs=1, batch_size=100, width=8, progress=False,
                         threads=1)
    with loss_stream("demo", 1000, spill_dir=tmp_path) as stream:
        assert stream.url.startswith("unix://")  # nobody started a server by hand
        fit(config, reporter=stream.reporter)
        summary = stream.finish(k=5)
    assert summary.delivery.ok and summary.info.records == 1000
    assert len(summary.hardest) == 5
    emas = [h["ema"] for h in summary.hardest]
    assert emas == sorted(emas, reverse=True)
    text = format_hardest(summary)
    assert "1,000 of 1,000 records delivered" in text
    assert str(summary.hardest[0]["sample_id"]) in text


def test_two_reporters_on_one_rank_is_an_error_not_a_silent_loss(
        redis_client: redis.Redis, redis_url: str, spill_dir: Path) -> None:
    LossStore(redis_client).register_run("r", 10)
    first = LossReporter(redis_url, "r", rank=0, spill_dir=spill_dir, linger_s=0)
    first.report([1], [1.0], [True], 0, 0)
    assert first.flush(10).ok
    second = LossReporter(redis_url, "r", rank=0, spill_dir=spill_dir / "2", linger_s=0)
    second.report([2], [2.0], [True], 0, 0)
    assert second.close(10).ok
    with contextlib.suppress(ReporterError):
        first.report([3], [3.0], [True], 1, 0)
    report = first.close(10)
    assert "another reporter is using this rank" in (report.error or "")
    assert LossStore(redis_client).run_info("r").records == 2


def test_redis_restart_that_loses_its_last_writes_loses_no_record(
        restartable: EmbeddedRedis, spill_dir: Path) -> None:
    """Redis comes back from an older append-only file (as after a crash of the machine, when
    the last second was not on disk yet): the reporter sends the lost batches again, and a
    consumer that had applied them rebuilds its table instead of counting them twice."""
    restartable.start()
    url = restartable.url
    store = LossStore.from_url(url)
    store.register_run("lost", 3000)
    consumer = Materializer(LossStore.from_url(url), "lost", snapshot_interval_s=0.2)
    consumer.start(block_ms=50)
    rep = LossReporter(url, "lost", spill_dir=spill_dir, max_batch_records=200, linger_s=0.0,
                       replay_window_s=30.0)
    rec = Recording(rep)
    rng = np.random.default_rng(7)

    def aof_files() -> list[Path]:  # appendonlydir/ (Redis 7) or appendonly.aof (older)
        return list(restartable.data_dir.glob("appendonly*"))
    for step in range(40):
        rec.report(*random_batch(rng, 3000, 100), step, 0)
    assert rep.flush(30).ok
    time.sleep(0.5)  # a snapshot or two
    saved = Path(tempfile.mkdtemp(prefix="hbaof-"))
    for p in aof_files():
        (shutil.copytree if p.is_dir() else shutil.copy)(p, saved / p.name)
    for step in range(40, 80):
        rec.report(*random_batch(rng, 3000, 100), step, 0)
    assert rep.flush(30).ok
    deadline = time.monotonic() + 30
    while consumer.stats().consumed_records < 8000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert consumer.stats().consumed_records == 8000
    restartable.kill()
    for p in aof_files():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in saved.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy)(p, restartable.data_dir / p.name)
    shutil.rmtree(saved)
    restartable.start()
    assert store.run_info("lost").records < 8000, "the restart lost writes"
    for step in range(80, 100):
        rec.report(*random_batch(rng, 3000, 100), step, 0)
    report = rep.close(60)
    assert report.ok and report.replayed_batches > 0, report
    expected_records = 100 * 100
    deadline = time.monotonic() + 30
    while (store.run_info("lost").consumed_records < expected_records
           and time.monotonic() < deadline):
        time.sleep(0.05)
    consumer.stop()
    assert store.run_info("lost").records == expected_records
    assert consumer.reloads >= 1
    assert int(consumer.table.seen.sum()) == expected_records
    assert int(materialize(url, "lost").table.seen.sum()) == expected_records


def test_spill_files_of_runs_whose_names_extend_each_other_stay_apart(spill_dir: Path) -> None:
    dead = "unix:///tmp/hb-nothing-here.sock"
    rng = np.random.default_rng(4)
    a = LossReporter(dead, "a", spill_dir=spill_dir, max_batch_records=50, seq_start=10)
    b = LossReporter(dead, "a-r0", spill_dir=spill_dir, max_batch_records=50, seq_start=10)
    a.report(*random_batch(rng, 100, 50), 0, 0)
    b.report(*random_batch(rng, 100, 30), 0, 0)
    left_a, left_b = a.close(0.1), b.close(0.1)
    assert left_a.pending_records == 50 and left_b.pending_records == 30
    # The next reporter of run "a", rank 0 adopts only run "a"'s records.
    nxt = LossReporter(dead, "a", spill_dir=spill_dir, seq_start=1000, start=False)
    assert nxt._report().reported_records == 50
    nxt.close(0.1)
    mode = (spill_dir / "a").stat().st_mode & 0o777
    assert mode == 0o700 and (spill_dir.stat().st_mode & 0o777) == 0o700


def test_spill_file_is_capped_in_bytes(spill_dir: Path) -> None:
    rep = LossReporter("unix:///tmp/hb-nothing-here.sock", "capped", spill_dir=spill_dir,
                       max_buffer_records=100, max_batch_records=100, max_spill_bytes=5_000)
    rng = np.random.default_rng(5)
    for step in range(20):
        rep.report(*random_batch(rng, 100, 100), step, 0)
        time.sleep(0.05)
    time.sleep(1.5)
    report = rep.close(0.1)
    assert report.overflow_records > 0 and not report.ok, report
    assert report.spilled_records * 17 <= 5_000
    assert all(p.stat().st_size <= 5_000 for p in spill_dir.rglob("*.spill"))


def test_deleting_a_run_removes_its_spill_files(spill_dir: Path, redis_url: str,
                                                redis_client: redis.Redis) -> None:
    from click.testing import CliRunner

    from hardbatch.cli import main

    LossStore(redis_client).register_run("del", 10)
    rep = LossReporter("unix:///tmp/hb-nothing-here.sock", "del", spill_dir=spill_dir)
    rep.report([1, 2], [1.0, 2.0], [True, False], 0, 0)
    assert rep.close(0.1).spill_path
    r = CliRunner().invoke(main, ["runs", "--delete", "del", "--redis-url", redis_url,
                                  "--spill-dir", str(spill_dir)])
    assert r.exit_code == 0, r.output
    assert "1 spill files" in r.output and not list(spill_dir.rglob("*.spill"))
    assert LossStore(redis_client).runs() == []


def test_spill_root_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HARDBATCH_SPILL_DIR", str(tmp_path / "mine"))
    assert spill_folder(None, "run-a") == tmp_path / "mine" / "run-a"
    assert (tmp_path / "mine").stat().st_mode & 0o777 == 0o700


def test_redis_out_of_memory_for_a_while_delays_delivery_but_loses_nothing(spill_dir: Path):
    with EmbeddedRedis(tcp=True) as server:
        store = LossStore.from_url(server.url)
        store.register_run("oom", 1000)
        store.client.config_set("maxmemory-policy", "noeviction")
        rep = LossReporter(server.url, "oom", 0, linger_s=0.0, spill_dir=spill_dir)
        try:
            ids = np.arange(100)
            rep.report(ids, np.ones(100, np.float32), np.ones(100, bool), 1, 0)
            assert rep.flush(10).ok
            store.client.config_set("maxmemory", 1)
            rep.report(ids, np.ones(100, np.float32), np.ones(100, bool), 2, 0)
            time.sleep(1.0)  # the ingest script's write is refused with OOM meanwhile
            assert "OOM" in (rep.flush(0.1).error or "")
            store.client.config_set("maxmemory", 0)
            rep.report(ids, np.ones(100, np.float32), np.ones(100, bool), 3, 0)
            report = rep.flush(10)
        finally:
            rep.close(10)
        assert report.ok and report.pending_records == 0, report
        assert store.run_info("oom").records == 300
