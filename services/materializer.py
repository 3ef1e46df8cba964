"""The consumer: turns a run's loss log into an in-memory `HardnessTable`.

A `Materializer` starts from the run's latest snapshot (or an empty table), then applies the
log entries after it, in log order. Because the table is a pure function of the log prefix it
has consumed, any consumer that reads the same prefix holds the same table, bit for bit; a
restarted consumer loads the snapshot and replays the rest. `snapshot()` writes the table back
to Redis with the log position it stands at, and trims the log up to there.

Typical use in a service (one per run, in a background thread):

    m = Materializer(store, run)       # loads snapshot + nothing else yet
    m.start()                          # thread: poll, apply, snapshot every 30 s
    with m.view() as table:            # read under the lock
        hardest = table.hardest(10)
    m.stop()                           # final snapshot, thread joined

or single-threaded: `m.catch_up()` applies everything appended so far. A service with many runs
reads all their logs with one blocking read (`LossStore.read_logs`) and hands each run's entries
to `m.apply(entries)`.

A Redis that restarts from its append-only file can come back without the last second of log
entries, some of which this table already holds. The next entry then carries an index this
consumer has already passed: it reloads the run's snapshot (which the restored store agrees
with) and replays the log from there, so the table never counts a record twice when the
reporters send the lost batches again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from hardbatch.sampler.hardness import FIELDS, HardnessTable, split_valid
from hardbatch.sampler.records import RECORD_SIZE, unpack_many
from hardbatch.services.store import CONSUMER_FIELDS, LogEntry, LossStore, Snapshot, StoreError

log = logging.getLogger(__name__)

APPLY_SLICE = 1 << 17  # records applied per lock hold (~10-30 ms)
MAX_CANDIDATES = 3  # table copies kept at epoch starts until a checkpoint confirms one

# A copy of the table: its arrays, the stream id it stands at, its consumer counters.
_Copy = tuple[dict[str, np.ndarray], str, dict[str, int]]


@dataclass(frozen=True)
class MaterializerStats:
    """Where a materializer stands.

    Attributes:
        consumed_entries: dense index of the last log entry applied.
        consumed_records: records read from the log (applied + rejected).
        applied_records: records applied to the table.
        rejected_out_of_range / rejected_nonfinite: records refused.
        last_id: stream id of the last entry applied.
        snapshots: snapshots this materializer wrote.
        last_error: the last error the background loop hit (it keeps retrying), or None.
    """

    consumed_entries: int
    consumed_records: int
    applied_records: int
    rejected_out_of_range: int
    rejected_nonfinite: int
    last_id: str
    snapshots: int
    last_error: str | None


class Materializer:
    """Applies a run's loss log to an in-memory hardness table.

    Thread-safety: `poll`, `catch_up` and `snapshot` may be called from any thread (polls are
    serialized). Readers take `view()` (or `lock`) to see a table that is not being written:
    always the result of applying some prefix of the log, in order. `table` is always the same
    object, updated in place.

    Args:
        store: the loss store.
        run: a registered run (UnknownRunError otherwise).
        read_count: log entries read per poll (an entry holds up to 65,536 records; the table
            lock is held while a poll's records are applied).
        snapshot_interval_s: in the background loop, snapshot this often when something new
            was applied (None: only on stop).
        publish: write consumer counters to the run's meta after each poll (for run_info).
    """

    def __init__(self, store: LossStore, run: str, *, read_count: int = 16,
                 snapshot_interval_s: float | None = 30.0, publish: bool = True) -> None:
        if read_count < 1:
            raise ValueError(f"read_count must be >= 1, got {read_count}")
        self.store = store
        self.run = run
        self.read_count = read_count
        self.snapshot_interval_s = snapshot_interval_s
        self.publish = publish
        info = store.run_info(run)
        self.lock = threading.RLock()
        self._poll_lock = threading.Lock()
        self.table = HardnessTable(info.num_samples, info.ema_decay)
        self._counters = dict.fromkeys(CONSUMER_FIELDS, 0)
        self._last_id = "0-0"
        self._snapshots = 0
        self._last_error: str | None = None
        self._snap_entries = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unpublished = False
        self.reloads = 0  # times the table was rebuilt from a snapshot (gap, lost entries, resume)
        # Exactly once across restarts from checkpoints (docs/store.md, "Attempts"):
        self._fences: dict[int, int] = {}  # attempt -> checkpoint step it resumed from
        self._attempt_max: dict[int, int] = {}  # attempt -> highest live step applied since reload
        # Copies of the table at epoch starts (candidates) and the newest one a checkpoint
        # marker has confirmed (safe): what snapshot() writes while the live table is not final.
        self._candidates: list[_Copy] = []
        self._safe: _Copy | None = None
        self._max_epoch = -1
        self._reload(store.load_snapshot(run))

    # -- reading ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def view(self) -> Iterator[HardnessTable]:
        """The table, held still (nothing is applied while the block runs). Keep blocks short."""
        with self.lock:
            yield self.table

    def stats(self) -> MaterializerStats:
        with self.lock:
            c = dict(self._counters)
            return MaterializerStats(
                consumed_entries=c["consumed_entries"],
                consumed_records=c["consumed_records"],
                applied_records=self.table.applied,
                rejected_out_of_range=c["rejected_out_of_range"],
                rejected_nonfinite=c["rejected_nonfinite"],
                last_id=self._last_id,
                snapshots=self._snapshots,
                last_error=self._last_error,
            )

    # -- applying --------------------------------------------------------------------------

    def _reload(self, snap: Snapshot | None) -> None:
        self._fences = self.store.fences(self.run)
        self._attempt_max = {}  # a snapshot holds final records only: none can be superseded
        self._safe, self._candidates, self._max_epoch = None, [], -1
        with self.lock:
            if snap is None:
                for f in FIELDS:
                    getattr(self.table, f)[:] = 0
                self.table.applied = 0
                self._counters = dict.fromkeys(CONSUMER_FIELDS, 0)
                self._last_id = "0-0"
                self._snap_entries = 0
                return
            for f in FIELDS:
                getattr(self.table, f)[:] = getattr(snap.table, f)
            self.table.applied = snap.table.applied
            self._counters = {k: snap.counters.get(k, 0) for k in CONSUMER_FIELDS}
            self._counters["consumed_entries"] = snap.entries
            self._last_id = snap.stream_id
            self._snap_entries = snap.entries

    def poll(self, block_ms: int | None = None, max_entries: int | None = None) -> int:
        """Applies the next log entries, if any.

        Args:
            block_ms: wait up to this long for an entry when none is there (None: don't wait).
            max_entries: at most this many entries (default `read_count`).

        Returns:
            Number of records consumed (applied or rejected).

        Raises:
            StoreError: the log lost entries this consumer has not seen and no snapshot covers
                them (e.g. Redis restarted without persistence).
            UnknownRunError: the run was deleted.
            redis.ConnectionError / redis.TimeoutError: Redis is unreachable.
        """
        with self._poll_lock:
            entries = self.store.read_log(
                self.run, self._last_id, count=max_entries or self.read_count, block_ms=block_ms
            )
            return self._apply(entries)

    @property
    def last_id(self) -> str:
        """Stream id of the last log entry applied (read the log after it)."""
        return self._last_id

    def apply(self, entries: list[LogEntry]) -> int:
        """Applies entries someone else read from this run's log after `last_id`.

        Entries at or before `last_id` (applied meanwhile by a poll) are skipped.

        Returns:
            Number of records consumed. Raises like `poll`.
        """
        with self._poll_lock:
            last = _id_tuple(self._last_id)
            return self._apply([e for e in entries if _id_tuple(e.id) > last])

    def _apply(self, entries: list[LogEntry]) -> int:
        if not entries:
            return 0
        expected = self._counters["consumed_entries"] + 1
        if entries[0].index != expected:
            return self._recover_gap(expected, entries[0].index)
        for j, e in enumerate(entries):
            if e.index != expected + j:
                raise StoreError(
                    f"run {self.run}: log entry {e.id} has index {e.index}, "
                    f"expected {expected + j}"
                )
        total, group_epoch = 0, -1
        group: list[LogEntry] = []
        for e in entries:
            if e.kind:
                total += self._apply_data(group)
                group, group_epoch = [], -1
                if self._apply_marker(e):
                    self.publish_pending()
                    return total  # rebuilt from the snapshot: the next poll replays from there
                continue
            if e.attempt is not None:
                epoch = self._entry_top_epoch(e)
                if epoch > max(group_epoch, self._max_epoch):
                    # A new epoch starts: its checkpoint is the next a marker may confirm, so
                    # the state before it is one a snapshot may later write.
                    total += self._apply_data(group)
                    group, group_epoch = [], -1
                    self._keep_candidate()
                    self._max_epoch = epoch
                group_epoch = max(group_epoch, epoch)
            group.append(e)
        total += self._apply_data(group)
        self.publish_pending()
        return total

    def _entry_top_epoch(self, e: LogEntry) -> int:
        records = unpack_many([e.payload])
        live = records["step"] <= self._void_after(e.attempt)
        return int(records["epoch"][live].max()) if live.any() else -1

    def _void_after(self, attempt: int | None) -> int:
        """Records of `attempt` with a step above this are superseded by a later attempt."""
        if attempt is None:
            return 2**32
        return min((s for a, s in self._fences.items() if a > attempt), default=2**32)

    def _apply_marker(self, e: LogEntry) -> bool:
        """Applies a resume/checkpoint marker; True if the table had to be rebuilt."""
        attempt = e.attempt or 0
        if e.kind == "resume" and any(a < attempt and s > e.step
                                      for a, s in self._attempt_max.items()):
            # Records this attempt trains again were applied: start over from the snapshot
            # (which holds final records only) and replay the log without the superseded ones.
            snap = self.store.load_snapshot(self.run)
            if snap is not None and snap.counters.get("max_step", 0) > e.step:
                raise StoreError(
                    f"run {self.run}: attempt {attempt} resumes after step {e.step}, but the "
                    f"snapshot holds records up to step {snap.counters['max_step']} (a "
                    "checkpoint was confirmed that the restart did not resume from)")
            log.info("run %s: attempt %d resumes after step %d; rebuilding the table from "
                     "its snapshot", self.run, attempt, e.step)
            self._reload(snap)
            self.reloads += 1
            return True
        if e.kind == "resume":
            self._fences[attempt] = e.step
        with self.lock:
            c = self._counters
            c["consumed_entries"] = e.index
            c["confirmed_step"] = max(c["confirmed_step"], e.step)
            self._last_id = e.id
            self._unpublished = True
            self._promote_candidates()
        return False

    def _apply_data(self, entries: list[LogEntry]) -> int:
        if not entries:
            return 0
        records = unpack_many([e.payload for e in entries])
        limits = np.repeat([self._void_after(e.attempt) for e in entries],
                           [len(e.payload) // RECORD_SIZE for e in entries])
        live = records["step"] <= limits
        superseded = int(len(records) - live.sum())
        for e in entries:
            if e.attempt is not None:
                mine = unpack_many([e.payload])["step"]
                mine = mine[mine <= self._void_after(e.attempt)]
                if len(mine):
                    self._attempt_max[e.attempt] = max(self._attempt_max.get(e.attempt, 0),
                                                       int(mine.max()))
        tagged_steps = records["step"][live & (np.repeat(
            [e.attempt is not None for e in entries],
            [len(e.payload) // RECORD_SIZE for e in entries]))]
        ids = records["sample_id"].astype(np.int64)[live]
        losses = np.ascontiguousarray(records["loss"][live])
        kept = records["kept"][live].astype(bool)
        step = np.ascontiguousarray(records["step"][live])
        round_ = np.ascontiguousarray(records["epoch"][live])
        mask, rej = split_valid(ids, losses, self.table.size)
        if mask is not None:
            ids, losses, kept, step = ids[mask], losses[mask], kept[mask], step[mask]
            round_ = round_[mask]
        # Apply in slices, letting readers in between: every state they can see is the
        # table after some prefix of the log, just not yet the counters that say so.
        for start in range(0, len(ids), APPLY_SLICE):
            sl = slice(start, start + APPLY_SLICE)
            with self.lock:
                self.table.apply_records(ids[sl], losses[sl], kept[sl], step[sl], round_[sl])
        with self.lock:
            c = self._counters
            c["consumed_entries"] = entries[-1].index
            c["consumed_records"] += len(records)
            c["rejected_out_of_range"] += rej.out_of_range
            c["rejected_nonfinite"] += rej.nonfinite
            c["superseded_records"] += superseded
            if len(tagged_steps):
                c["max_step"] = max(c["max_step"], int(tagged_steps.max()))
            self._last_id = entries[-1].id
            self._unpublished = True
        return len(records)

    def _keep_candidate(self) -> None:
        """Keeps a copy of the table as it stands (a few at most: the oldest go first)."""
        with self.lock:
            if self._candidates and self._candidates[-1][1] == self._last_id:
                return
            arrays = {f: getattr(self.table, f).copy() for f in FIELDS}
            self._candidates.append((arrays, self._last_id, dict(self._counters)))
            del self._candidates[:-MAX_CANDIDATES]

    def _promote_candidates(self) -> None:
        """The newest kept copy that holds only confirmed steps becomes the one to snapshot."""
        confirmed = self._counters["confirmed_step"]
        final = [c for c in self._candidates if c[2]["max_step"] <= confirmed]
        if final:
            self._safe = final[-1]
            self._candidates = [c for c in self._candidates if c[2]["max_step"] > confirmed]

    def publish_pending(self) -> None:
        """Publishes the consumer counters if the last publish did not happen (or failed)."""
        if not self.publish or not self._unpublished:
            return
        with self.lock:
            counters = dict(self._counters)
        self.store.publish_consumer(self.run, counters)
        self._unpublished = False

    def _recover_gap(self, expected: int, got: int) -> int:
        snap = self.store.load_snapshot(self.run)
        if got < expected:
            # The store is behind this table: Redis restarted and lost entries we applied.
            # Start over from what it has; the reporters send the lost batches again.
            log.warning("run %s: log entry index %d where %d was expected: the store lost "
                        "entries (Redis restarted?); reloading from its snapshot at %d",
                        self.run, got, expected, snap.entries if snap else 0)
            self._reload(snap)
            self.reloads += 1
            return 0
        # Entries were trimmed under us (another consumer snapshotted past our position):
        # the snapshot covers them, so start over from it.
        if snap is None or snap.entries < expected - 1 or snap.entries < got - 1:
            raise StoreError(
                f"run {self.run}: log entry index {got} where {expected} was expected and no "
                "snapshot covers the gap (was Redis restarted without persistence?)"
            )
        log.info("run %s: log trimmed past entry %d, reloading snapshot at %d",
                 self.run, expected - 1, snap.entries)
        self._reload(snap)
        self.reloads += 1
        return 0

    def catch_up(self, timeout_s: float | None = None) -> int:
        """Polls until everything appended before the call is applied.

        Returns:
            Records consumed.

        Raises:
            TimeoutError: not caught up within `timeout_s`.
        """
        target = self.store.run_info(self.run).entries
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        total = 0
        while self._counters["consumed_entries"] < target:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"run {self.run}: consumed {self._counters['consumed_entries']} of "
                    f"{target} log entries in {timeout_s} s"
                )
            total += self.poll(block_ms=100)
        return total

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self) -> bool:
        """Writes the table and its log position to Redis; trims the log up to it.

        Returns:
            True if it became the run's current snapshot (False if one further along exists,
            or there was nothing new since the last one).
        """
        # The poll lock: never copy a table that a poll has applied part of.
        with self._poll_lock, self.lock:
            c = self._counters
            if c["max_step"] > c["confirmed_step"]:
                # The table holds records a resume may still supersede: write the last state
                # that held final records only (or nothing), so a rebuild can start from it.
                if self._safe is None or self._safe[2]["consumed_entries"] <= self._snap_entries:
                    return False
                arrays, stream_id, counters = self._safe
            else:
                if c["consumed_entries"] == self._snap_entries:
                    return False
                arrays = {f: getattr(self.table, f).copy() for f in FIELDS}
                stream_id = self._last_id
                counters = dict(c)
        done = self.store.write_snapshot(
            self.run, arrays, stream_id, counters["consumed_entries"], counters
        )
        with self.lock:
            self._snapshots += 1
            self._snap_entries = counters["consumed_entries"]
        return done

    # -- background loop -------------------------------------------------------------------

    def run_forever(self, stop: threading.Event, block_ms: int = 200) -> None:
        """Polls until `stop` is set, snapshotting every `snapshot_interval_s`.

        Redis errors are logged, kept in `stats().last_error` and retried with backoff: the
        loop only ends when asked to.
        """
        backoff = 0.05
        last_snap = time.monotonic()
        while not stop.is_set():
            try:
                self.poll(block_ms=block_ms)
                interval = self.snapshot_interval_s
                if interval is not None and time.monotonic() - last_snap >= interval:
                    self.snapshot()
                    last_snap = time.monotonic()
                backoff = 0.05
                self._last_error = None
            except (redis.RedisError, StoreError) as e:
                # Any Redis error (down, out of memory, read-only) is retried: a table that
                # silently stops following its log is the one outcome not allowed.
                self._last_error = f"{type(e).__name__}: {e}"
                log.warning("materializer %s: %s (retrying in %.2f s)", self.run, e, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def start(self, block_ms: int = 200) -> None:
        """Runs `run_forever` in a daemon thread."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"materializer for {self.run} already started")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run_forever, args=(self._stop, block_ms),
            name=f"materializer-{self.run}", daemon=True,
        )
        self._thread.start()

    def stop(self, timeout_s: float = 10.0, final_snapshot: bool = True) -> None:
        """Stops the thread (if any) and takes a last snapshot (best effort)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        if final_snapshot:
            try:
                self.snapshot()
            except (redis.RedisError, StoreError) as e:
                log.warning("materializer %s: final snapshot failed: %s", self.run, e)

    def __enter__(self) -> Materializer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _id_tuple(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)
