"""The loss store and its materializer, against a real Redis server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from hardbatch.sampler.hardness import DEFAULT_DECAY, FIELDS, HardnessTable, split_valid
from hardbatch.sampler.records import RECORD_SIZE, pack, to_bytes
from hardbatch.services import keys
from hardbatch.services.materializer import Materializer
from hardbatch.services.store import (
    CHUNK_SAMPLES,
    LossStore,
    RunSizeMismatchError,
    StoreError,
    UnknownRunError,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(redis_client: redis.Redis) -> LossStore:
    return LossStore(redis_client)


def make_batches(n_batches: int, size: int, per_batch: int, seed: int = 0,
                 bad: bool = False) -> list[np.ndarray]:
    """Random record batches; with bad=True some ids are out of range and some losses NaN."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n_batches):
        ids = rng.integers(0, size, per_batch)
        losses = rng.gamma(2.0, 1.0, per_batch).astype(np.float32)
        if bad and b % 7 == 3:
            ids[0] = size + 5
            losses[1] = np.nan
            losses[2] = np.inf
        kept = rng.random(per_batch) < 0.4
        out.append(pack(ids, losses, kept, step=b, epoch=b // 10, rank=b % 3))
    return out


def reference_table(batches: list[np.ndarray], size: int,
                    decay: float = DEFAULT_DECAY) -> HardnessTable:
    """What applying every valid record exactly once, in order, gives."""
    table = HardnessTable(size, decay)
    for recs in batches:
        ids = recs["sample_id"].astype(np.int64)
        losses = recs["loss"].copy()
        mask, _ = split_valid(ids, losses, size)
        sel = slice(None) if mask is None else mask
        table.apply(ids[sel], losses[sel], recs["kept"][sel].astype(bool), recs["step"][sel],
                    recs["epoch"][sel])
    return table


def ingest_all(store: LossStore, run: str, batches: list[np.ndarray], start: int = 0) -> None:
    for j, recs in enumerate(batches):
        assert store.ingest_records(run, 0, start + j, recs)


# -- runs ---------------------------------------------------------------------------------


def test_register_and_reregister(store: LossStore) -> None:
    assert store.register_run("a", 100) is True
    assert store.register_run("a", 100) is False
    with pytest.raises(RunSizeMismatchError, match="num_samples=100"):
        store.register_run("a", 101)
    with pytest.raises(RunSizeMismatchError):
        store.register_run("a", 100, ema_decay=0.9)
    store.register_run("b", 5)
    assert store.runs() == ["a", "b"]
    info = store.run_info("a")
    assert (info.num_samples, info.ema_decay, info.entries, info.records) == (
        100, DEFAULT_DECAY, 0, 0)


@pytest.mark.parametrize("name", ["", "a b", "x" * 200, "{x}", "-lead", "a:b"])
def test_bad_run_names(store: LossStore, name: str) -> None:
    with pytest.raises(StoreError, match="bad run name"):
        store.register_run(name, 10)


@pytest.mark.parametrize("size", [0, -1, 2**32, 1.5, True])
def test_bad_sizes(store: LossStore, size) -> None:
    with pytest.raises(StoreError, match="num_samples"):
        store.register_run("r", size)


def test_unknown_run_is_a_clear_error(store: LossStore) -> None:
    payload = to_bytes(pack([1], [1.0], [1], 0, 0, 0))
    with pytest.raises(UnknownRunError, match="unknown run 'nope'"):
        store.ingest("nope", 0, 1, payload)
    with pytest.raises(UnknownRunError):
        store.run_info("nope")
    with pytest.raises(UnknownRunError):
        Materializer(store, "nope")
    assert store.runs() == []


# -- ingest -------------------------------------------------------------------------------


def test_ingest_is_idempotent_by_rank_and_seq(store: LossStore) -> None:
    store.register_run("r", 10)
    p = to_bytes(pack([1, 2], [1.0, 2.0], [1, 0], 0, 0, 0))
    assert store.ingest("r", 0, 5, p) is True
    assert store.ingest("r", 0, 5, p) is False  # a resend
    assert store.ingest("r", 0, 4, p) is False  # older than the last accepted
    assert store.ingest("r", 1, 5, p) is True  # another rank has its own numbers
    assert store.ingest("r", 0, 6, p) is True
    info = store.run_info("r")
    assert (info.entries, info.records, info.duplicate_batches) == (3, 6, 2)
    assert info.ranks == {0: 6, 1: 5} and info.lag_records == 6
    assert store.last_seq("r", 0) == 6 and store.last_seq("r", 9) is None


def test_malformed_payload_and_bad_arguments(store: LossStore) -> None:
    store.register_run("r", 10)
    with pytest.raises(StoreError, match="MALFORMED"):
        store.ingest("r", 0, 1, b"x" * (RECORD_SIZE + 1))
    for rank, seq in [(-1, 1), (2**16, 1), (0, -1), (0, 2**53)]:
        with pytest.raises(StoreError):
            store.ingest("r", rank, seq, b"")
    info = store.run_info("r")
    assert info.entries == 0 and info.malformed_batches == 1


# -- materializer -------------------------------------------------------------------------


def test_materializer_matches_reference_and_counts_rejections(store: LossStore) -> None:
    size = 500
    store.register_run("r", size)
    batches = make_batches(60, size, 200, bad=True)
    ingest_all(store, "r", batches)
    m = Materializer(store, "r", read_count=7)
    consumed = m.catch_up(timeout_s=30)
    assert consumed == 60 * 200
    assert m.table.equals(reference_table(batches, size))
    st = m.stats()
    bad_batches = sum(1 for b in range(60) if b % 7 == 3)
    assert st.rejected_out_of_range == bad_batches
    assert st.rejected_nonfinite == 2 * bad_batches
    assert st.applied_records == 60 * 200 - 3 * bad_batches == m.table.applied
    info = store.run_info("r")
    assert info.rejected == 3 * bad_batches and info.lag_records == 0
    assert info.consumed_entries == 60


def test_poll_returns_zero_when_idle(store: LossStore) -> None:
    store.register_run("r", 10)
    m = Materializer(store, "r")
    t0 = time.monotonic()
    assert m.poll(block_ms=50) == 0
    assert time.monotonic() - t0 >= 0.04


def test_snapshot_trims_log_and_restart_rebuilds_same_table(store: LossStore) -> None:
    size = 3000
    store.register_run("r", size)
    batches = make_batches(40, size, 300, seed=1)
    ingest_all(store, "r", batches[:25])
    m = Materializer(store, "r")
    m.catch_up(30)
    assert m.snapshot() is True
    assert m.snapshot() is False  # nothing new since
    info = store.run_info("r")
    assert info.snapshot_entries == 25 and info.log_entries == 0
    ingest_all(store, "r", batches[25:], start=25)
    m2 = Materializer(store, "r")  # snapshot at 25, then replay 15
    assert m2.stats().consumed_entries == 25
    m2.catch_up(30)
    ref = reference_table(batches, size)
    assert m2.table.equals(ref)
    m.catch_up(30)
    assert m.table.equals(ref) and m.table.applied == m2.table.applied == ref.applied


def test_snapshot_of_table_larger_than_one_chunk(store: LossStore) -> None:
    size = CHUNK_SAMPLES + 1000
    store.register_run("big", size)
    recs = pack(np.array([0, CHUNK_SAMPLES - 1, CHUNK_SAMPLES, size - 1]),
                np.array([1, 2, 3, 4], np.float32), np.ones(4, bool), 7, 0, 0)
    store.ingest_records("big", 0, 1, recs)
    m = Materializer(store, "big")
    m.catch_up(30)
    m.snapshot()
    again = Materializer(store, "big")
    assert again.table.equals(m.table)
    assert list(again.table.last_loss[[0, CHUNK_SAMPLES - 1, CHUNK_SAMPLES, size - 1]]) == [
        1, 2, 3, 4]
    # Old generations are deleted: one set of chunks (one per field x 2 chunks) stays.
    m.catch_up(30)
    store.ingest_records("big", 0, 2, recs)
    m.catch_up(30)
    m.snapshot()
    assert len(list(store.client.scan_iter(match="hb:{big}:snap:*"))) == 2 * len(FIELDS)


def test_lagging_consumer_recovers_when_log_trimmed_under_it(store: LossStore) -> None:
    size = 800
    store.register_run("r", size)
    batches = make_batches(30, size, 100, seed=2)
    ingest_all(store, "r", batches[:10])
    lagging = Materializer(store, "r", publish=False)
    lagging.catch_up(30)
    ingest_all(store, "r", batches[10:20], start=10)
    leader = Materializer(store, "r")
    leader.catch_up(30)
    leader.snapshot()  # trims entries 11..20 that `lagging` never read
    ingest_all(store, "r", batches[20:], start=20)
    lagging.catch_up(30)
    assert lagging.table.equals(reference_table(batches, size))


def test_log_lost_without_snapshot_is_an_error_not_a_wrong_table(store: LossStore) -> None:
    store.register_run("r", 100)
    batches = make_batches(6, 100, 10)
    ingest_all(store, "r", batches[:3])
    m = Materializer(store, "r")
    ingest_all(store, "r", batches[3:], start=3)
    # Simulate a store that lost entries (e.g. restarted without persistence).
    first = store.client.xrange(keys.log("r"), count=2)
    store.client.xdel(keys.log("r"), first[0][0], first[1][0])
    before = m.table.copy()
    with pytest.raises(StoreError, match="no snapshot covers the gap"):
        m.poll()
    assert m.table.equals(before)


def test_concurrent_reader_sees_whole_batches(store: LossStore) -> None:
    store.register_run("r", 1000)
    m = Materializer(store, "r", snapshot_interval_s=0.2)
    m.start(block_ms=20)
    try:
        for seq in range(20):
            recs = pack(np.arange(1000), np.full(1000, float(seq), np.float32),
                        np.ones(1000, bool), seq, 0, 0)
            store.ingest_records("r", 0, seq, recs)
            with m.view() as t:
                # Every batch covers all ids, so all ids were seen equally often.
                assert t.seen.min() == t.seen.max()
        deadline = time.monotonic() + 10
        while m.stats().consumed_entries < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert m.stats().consumed_entries == 20
    finally:
        m.stop()
    assert store.run_info("r").snapshot_entries == 20
    assert m.stats().last_error is None


def test_delete_run(store: LossStore) -> None:
    store.register_run("r", 10)
    ingest_all(store, "r", make_batches(3, 10, 5))
    m = Materializer(store, "r")
    m.catch_up(10)
    m.snapshot()
    store.delete_run("r")
    assert store.runs() == [] and not list(store.client.scan_iter(match="hb:{r}*"))
    with pytest.raises(UnknownRunError):
        store.run_info("r")


def test_a_run_deleted_while_its_snapshot_is_written_leaves_no_key(store: LossStore) -> None:
    store.register_run("r", 10)
    ingest_all(store, "r", make_batches(3, 10, 5))
    m = Materializer(store, "r")
    m.catch_up(10)
    run_script = store._run_script

    def delete_after_the_generation(script, run, names, args):
        out = run_script(script, run, names, args)
        if script is store._next_gen:  # delete_run's sweep comes before the chunks are written
            store.delete_run(run)
        return out

    store._run_script = delete_after_the_generation  # type: ignore[method-assign]
    with pytest.raises(UnknownRunError):
        m.snapshot()
    assert not list(store.client.scan_iter(match="hb:{r}*"))


def test_redis_memory_per_sample_of_snapshot(store: LossStore) -> None:
    size = 2_000_000
    store.client.execute_command("MEMORY", "PURGE")
    base = int(store.client.info("memory")["used_memory"])
    store.register_run("mem", size)
    ids = np.arange(size)
    for seq, start in enumerate(range(0, size, 500_000)):
        sl = ids[start:start + 500_000]
        store.ingest_records("mem", 0, seq, pack(sl, np.ones(len(sl), np.float32),
                                                 np.ones(len(sl), bool), 1, 0, 0))
    m = Materializer(store, "mem")
    m.catch_up(60)
    m.snapshot()
    used = int(store.client.info("memory")["used_memory"]) - base
    assert store.run_info("mem").log_entries == 0
    assert used / size <= 24, used / size
    print(f"bytes per sample: {used / size:.2f}")


# -- a consumer killed mid-stream ---------------------------------------------------------

CONSUMER = textwrap.dedent("""
    import sys, time
    from hardbatch.services.store import LossStore
    from hardbatch.services.materializer import Materializer
    store = LossStore.from_url(sys.argv[1])
    m = Materializer(store, sys.argv[2], read_count=3)
    n = 0
    while True:
        got = m.poll(block_ms=50)
        n += 1
        if n % 4 == 0:
            m.snapshot()
        time.sleep(0.01)
""")


def test_consumer_killed_mid_stream_rebuilds_exactly(store: LossStore, redis_url: str) -> None:
    size = 2000
    store.register_run("r", size)
    batches = make_batches(150, size, 250, seed=3, bad=True)
    ingest_all(store, "r", batches[:100])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CONSUMER, redis_url, "r"], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            info = store.run_info("r")
            if info.snapshot_entries >= 20 and info.consumed_entries >= 40:
                break
            assert proc.poll() is None, "consumer died on its own"
            assert time.monotonic() < deadline, "consumer made no progress"
            time.sleep(0.02)
        # More arrives while it runs; then it dies without warning, mid-stream.
        ingest_all(store, "r", batches[100:120], start=100)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    info = store.run_info("r")
    assert 0 < info.snapshot_entries < 120 and info.log_entries < 120  # it had trimmed
    ingest_all(store, "r", batches[120:], start=120)
    restarted = Materializer(store, "r")
    restarted.catch_up(60)
    assert restarted.table.equals(reference_table(batches, size))
    fresh_ref = reference_table(batches, size)
    assert restarted.table.applied == fresh_ref.applied


def test_chunks_of_a_writer_that_died_are_collected(store: LossStore) -> None:
    store.register_run("r", 100)
    ingest_all(store, "r", make_batches(4, 100, 20))
    m = Materializer(store, "r")
    m.catch_up(10)
    # A writer that took generation 7, wrote one chunk and died before committing.
    store.client.hset("hb:{r}:meta", "snap_gen_counter", 7)
    store.client.sadd("hb:{r}:snapgens", 7)
    store.client.set("hb:{r}:snap:7:ema:0", b"\0" * 400)
    assert m.snapshot() is True  # generation 8
    keys = sorted(k.decode() for k in store.client.scan_iter(match="hb:{r}:snap:*"))
    assert keys == sorted(f"hb:{{r}}:snap:8:{f}:0" for f in FIELDS)
    assert store.client.smembers("hb:{r}:snapgens") == {b"8"}
    # A stale snapshot (behind the current one) is refused and cleaned up.
    behind = store.write_snapshot("r", m.table.arrays(), "0-1", 1, {})
    assert behind is False
    assert store.client.smembers("hb:{r}:snapgens") == {b"8"}
    assert Materializer(store, "r").table.equals(m.table)
