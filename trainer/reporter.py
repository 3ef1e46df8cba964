"""Ships every scored example's loss to the loss store without ever making training wait.

`LossReporter.report()` packs the batch (17 bytes a record) and queues it; a background thread
delivers queued records to Redis in packed batches of up to `max_batch_records`, each with a
sequence number that the store uses to apply it at most once.

Where records wait, oldest first:

1. the batch in flight (formed, numbered, being sent or retried after an error);
2. the spill file (format and folders in `hardbatch.trainer.spill`): when Redis is unreachable
   and the in-memory queue passes `max_buffer_records`, the whole queue is numbered and
   appended to a local file, so memory stays bounded; frames are read back and sent, in order,
   once Redis answers again. The file is capped at `max_spill_bytes`: past it, records are
   dropped and counted (`overflow_records`), never training stalled;
3. the in-memory queue.

A batch is retried with the same number and bytes until the store answers, so a reply lost in
a connection drop is harmless: the store sees the same (run, rank, seq) again and ignores it.
Nothing is lost: `close()` writes whatever is still undelivered to the spill file and says so;
a later reporter for the same run and rank (same `spill_dir`) sends it first.

Sequence numbers start at the wall clock in microseconds, so a restarted worker's numbers
follow the previous incarnation's (the store ignores a seq that is not above the last).

A Redis that restarts from its append-only file may have lost the last second of writes,
batches it had acknowledged included. The reporter keeps the batches delivered in the last
`replay_window_s` seconds and sends each batch with the last seq the store acknowledged; a
store that holds less refuses it (`LostBatchesError`), and the reporter sends the lost batches
again, in order, before it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
from hardbatch.sampler.hardness import DEFAULT_DECAY
from hardbatch.sampler.records import (
    RECORD_DTYPE,
    RECORD_SIZE,
    as_columns,
    check_scalars,
    pack_dropping_bad_ids,
)
from hardbatch.services.redis_server import with_password
from hardbatch.services.store import (
    LossStore,
    LostBatchesError,
    StoreError,
    UnknownRunError,
    check_run_name,
)
from hardbatch.trainer.spill import (
    SpillError,
    SpillFile,
    SpillFull,
    read_spill,
    spill_folder,
    take_orphans,
)
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

__all__ = ["DeliveryReport", "LossReporter", "ReporterError", "read_spill"]

_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, OSError)
# Replies of a Redis that will take writes again soon: out of memory (a script's write is
# refused with this inside a script error), a replica, loading its file, a busy script.
_TRANSIENT_REPLIES = ("OOM ", "READONLY ", "LOADING ", "BUSY ", "TRYAGAIN ")


def _transient(e: Exception) -> bool:
    return isinstance(e, _TRANSIENT) or (
        isinstance(e, redis.ResponseError) and any(r in str(e) for r in _TRANSIENT_REPLIES))


class ReporterError(RuntimeError):
    """The reporter hit an error it cannot retry its way out of (e.g. unknown run)."""


@dataclass(frozen=True)
class DeliveryReport:
    """What a reporter did with the records it was given.

    Attributes:
        reported_records: records handed to `report()`.
        delivered_records: records the store holds (including batches it already had).
        delivered_batches: batches appended to the log.
        duplicate_batches: batches the store already had (a resend after a lost reply).
        pending_records: records not delivered (in memory, in flight or spilled).
        spilled_records: records that went through the spill file.
        invalid_records: records dropped because their id cannot be a sample id (< 0 or
            >= 2**32); ids merely beyond the dataset are the store's to count.
        overflow_records: records dropped because the spill file reached its byte cap.
        replayed_batches: delivered batches sent again after Redis lost them in a restart.
        spill_path: the spill file, if it still holds undelivered records.
        error: last delivery error, or the fatal one that stopped delivery.
    """

    reported_records: int
    delivered_records: int
    delivered_batches: int
    duplicate_batches: int
    pending_records: int
    spilled_records: int
    invalid_records: int
    overflow_records: int
    replayed_batches: int
    spill_path: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        """Everything reported was delivered."""
        return self.pending_records == 0 and self.overflow_records == 0


@dataclass
class _Item:
    """One report() call, copied but not yet packed (packing is the sender's work)."""

    ids: np.ndarray
    losses: np.ndarray
    kept: np.ndarray
    step: int
    epoch: int

    def __len__(self) -> int:
        return len(self.ids)

    def split(self, k: int) -> tuple[_Item, _Item]:
        head = _Item(self.ids[:k], self.losses[:k], self.kept[:k], self.step, self.epoch)
        tail = _Item(self.ids[k:], self.losses[k:], self.kept[k:], self.step, self.epoch)
        return head, tail


@dataclass
class _Batch:
    seq: int
    payload: bytes
    records: int
    from_spill: bool = False
    next_offset: int = 0  # spill file offset after this frame (from_spill only)
    attempts: int = 0
    delivered_at: float = 0.0


class LossReporter:
    """Streams loss records of one worker (rank) of one run to the store.

    Args:
        redis_url: the store's Redis.
        run: run name.
        rank: this worker's rank.
        num_samples: dataset size; when given the reporter registers the run (or checks that
            its size matches) before sending. When None the run must already be registered.
        ema_decay: moving-average decay to register the run with.
        max_buffer_records: records kept in memory while Redis is unreachable before spilling.
        max_batch_records: records per delivered batch (one log entry).
        spill_dir: root folder for spill files (default: a private `hardbatch-spill-<uid>`
            folder in the system temp folder); this run's go in its `<run>` subfolder.
        max_spill_bytes: cap on the spill file.
        replay_window_s: how long delivered batches are kept to resend after a Redis restart
            that lost them (Redis persists every second: a few seconds cover it).
        socket_timeout_s: Redis socket timeout of the sender.
        linger_s: how long the sender lets records gather before sending a batch smaller than
            `max_batch_records` (fewer, larger sends wake the training thread's GIL less).
        seq_start: first sequence number (default: wall clock in microseconds).
        start: start the sender thread now.

    Raises:
        ValueError: bad arguments.
    """

    def __init__(self, redis_url: str, run: str, rank: int = 0, *,
                 num_samples: int | None = None, ema_decay: float = DEFAULT_DECAY,
                 max_buffer_records: int = 1_000_000, max_batch_records: int = 65_536,
                 spill_dir: str | Path | None = None, max_spill_bytes: int = 1 << 30,
                 replay_window_s: float = 5.0, socket_timeout_s: float = 5.0,
                 linger_s: float = 0.2, seq_start: int | None = None,
                 start: bool = True) -> None:
        check_run_name(run)
        if isinstance(rank, bool) or not 0 <= int(rank) < 2**16:
            raise ValueError(f"rank must be in [0, 65535], got {rank}")
        if max_batch_records < 1 or max_buffer_records < max_batch_records:
            raise ValueError("need 1 <= max_batch_records <= max_buffer_records")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0.0 <= linger_s <= 10.0:
            raise ValueError(f"linger_s must be in [0, 10], got {linger_s}")
        self.run = run
        self.rank = int(rank)
        self.num_samples = num_samples
        self.ema_decay = ema_decay
        self.max_buffer_records = max_buffer_records
        self.max_batch_records = max_batch_records
        self.linger_s = linger_s
        self._store = LossStore(redis.Redis.from_url(
            with_password(redis_url), socket_timeout=socket_timeout_s, socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0), decode_responses=False,
        ))
        self._seq = int(seq_start) if seq_start is not None else time.time_ns() // 1000
        self._first_seq = self._seq
        self.replay_window_s = replay_window_s
        folder = spill_folder(spill_dir, run)
        self._orphans, orphan_frames = take_orphans(folder, self.rank)
        self._spill = SpillFile(folder / f"r{self.rank}-{self._seq}.spill", max_spill_bytes)
        self._recent: deque[_Batch] = deque()  # delivered, kept for replay_window_s
        self._replay: deque[_Batch] = deque()  # to resend before anything else
        self._acked: int | None = None  # the last seq the store acknowledged
        # The training attempt that scores the records (a Ray Train restart from a checkpoint
        # starts a new one; LossStore.resume): set before the first report of the attempt.
        self.attempt: int | None = None

        self._cond = threading.Condition()
        self._mem: deque[_Item] = deque()
        self._mem_records = 0
        self._packing = 0  # records the sender took from memory and is packing
        self._mem_since = 0.0  # when the oldest record in memory arrived
        self._flushing = 0  # flush() calls waiting: send without lingering
        self._urgent = False  # send_now() was called: send what is queued without lingering
        self._inflight: _Batch | None = None
        self._reported = 0
        self._delivered = 0
        self._delivered_batches = 0
        self._duplicates = 0
        self._spilled = 0
        self._invalid = 0
        self._overflow = 0
        self._replayed = 0
        self._last_spill_log = -1e9
        self._error: str | None = None
        self._fatal: str | None = None
        self._closing = False
        self._ready = False
        self._thread = threading.Thread(target=self._run, name=f"loss-reporter-{run}-{rank}",
                                        daemon=True)
        self._adopt_orphans(orphan_frames)
        if start:
            self._thread.start()

    # -- the caller's side -----------------------------------------------------------------

    def report(self, ids: Any, losses: Any, kept: Any, step: int, epoch: int) -> None:
        """Queues one batch of scored examples; returns at once.

        Args:
            ids: sample ids (numpy array, list or CPU tensor), each in [0, 2**32).
            losses: per-sample losses (non-finite ones are counted as rejections by the store).
            kept: bool mask of the samples the filter kept.
            step: optimizer step.
            epoch: epoch.

        Only shapes, dtypes and the scalars are checked here, and the arrays copied: packing
        and the per-record checks run on the sender thread, off the training step. Ids that
        cannot be sample ids at all (< 0 or >= 2**32) are dropped there and counted in the
        delivery report (`invalid_records`); ids past the dataset and non-finite losses are
        counted by the store.

        Raises:
            ValueError: not 1-D, mismatched lengths, wrong dtypes, bad step or epoch.
            ReporterError: the reporter was closed, or delivery failed for good (unknown run,
                dataset size mismatch).
        """
        ids_a, losses_a, kept_a = as_columns(ids, losses, kept)
        step, epoch, _ = check_scalars(step, epoch, self.rank)
        if not len(ids_a):
            return
        records = _Item(ids_a.copy(), losses_a.copy(), kept_a.copy(), step, epoch)
        with self._cond:
            if self._fatal:
                raise ReporterError(self._fatal)
            if self._closing:
                raise ReporterError("report() after close()")
            was_empty = not self._mem_records
            if was_empty:
                self._mem_since = time.monotonic()
            self._mem.append(records)
            self._mem_records += len(records)
            self._reported += len(records)
            # Past the bound the sender thread spills (packing and writing a file here would
            # stall the training step), before its next send or retry: within ~1 s.
            # Wake the sender only when it has something new to decide: a linger to start or
            # a full batch. Waking it on every report would hand it the GIL every step.
            if was_empty or self._mem_records >= self.max_batch_records:
                self._cond.notify_all()

    def new_attempt(self, timeout_s: float = 60.0) -> int:
        """A new attempt number from the store (`LossStore.new_attempt`)."""
        box: list[int] = []
        self._mark(lambda run, _a, _s: box.append(self._store.new_attempt(run)), 0, 0, timeout_s)
        return box[0]

    def resume(self, attempt: int, step: int, timeout_s: float = 60.0) -> None:
        """Tags this reporter's records with `attempt` and tells the store that it continues
        from the checkpoint at `step` (`LossStore.resume`; retried while Redis is down)."""
        self.attempt = int(attempt)
        self._mark(self._store.resume, attempt, step, timeout_s)

    def checkpointed(self, attempt: int, step: int) -> None:
        """Tells the store that a checkpoint at `step` is persisted (best effort: a missed one
        only delays the table's next snapshot)."""
        try:
            self._mark(self._store.checkpointed, attempt, step, 5.0)
        except (redis.RedisError, TimeoutError) as e:
            log.warning("run %s: checkpoint marker at step %d not written: %s", self.run, step, e)

    def _mark(self, call: Any, attempt: int, step: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                call(self.run, attempt, step)
                return
            except UnknownRunError:
                if self.num_samples is None:
                    raise
                self._store.register_run(self.run, self.num_samples, self.ema_decay)
            except redis.RedisError as e:
                if not _transient(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def send_now(self) -> None:
        """Sends what is queued without lingering; returns at once (a round's end: the
        service composes the next round once it has this one's losses)."""
        with self._cond:
            if self._mem_records:
                self._urgent = True
                self._cond.notify_all()

    def flush(self, timeout_s: float | None = 30.0) -> DeliveryReport:
        """Waits until everything reported so far is delivered, or `timeout_s` passes."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._pending() and not self._fatal:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._cond.wait(0.1 if left is None else min(left, 0.1))
            finally:
                self._flushing -= 1
            return self._report()

    def close(self, timeout_s: float | None = 30.0) -> DeliveryReport:
        """Flushes, stops the sender and leaves anything undelivered in the spill file.

        Returns:
            The delivery report; `spill_path` names the file holding undelivered records.
        """
        self.flush(timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(10.0)
        with self._cond:
            if self._pending():
                self._persist_all()
            else:
                self._spill.path.unlink(missing_ok=True)
                # One empty folder per finished run would pile up in the spill root.
                with contextlib.suppress(OSError):
                    self._spill.path.parent.rmdir()
            rep = self._report()
        self._store.client.close()
        return rep

    def __enter__(self) -> LossReporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _pending(self) -> int:
        inflight = self._inflight.records if self._inflight else 0
        replay = sum(b.records for b in self._replay)
        return self._mem_records + self._spill.pending_records + inflight + self._packing + replay

    def _report(self) -> DeliveryReport:
        pending = self._pending()
        return DeliveryReport(
            reported_records=self._reported,
            delivered_records=self._delivered,
            delivered_batches=self._delivered_batches,
            duplicate_batches=self._duplicates,
            pending_records=pending,
            spilled_records=self._spilled,
            invalid_records=self._invalid,
            overflow_records=self._overflow,
            replayed_batches=self._replayed,
            spill_path=str(self._spill.path) if pending and self._spill.path.exists() else None,
            error=self._fatal or self._error,
        )

    # -- spill file (all under self._cond) -------------------------------------------------

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def _take_items(self, limit: int) -> list[_Item]:
        """Pops up to `limit` records' worth of queued reports, oldest first."""
        items, n = [], 0
        while self._mem and n < limit:
            head = self._mem[0]
            if len(head) <= limit - n:
                items.append(self._mem.popleft())
            else:
                part, self._mem[0] = head.split(limit - n)
                items.append(part)
            n += len(items[-1])
        self._mem_records -= n
        return items

    def _pack(self, items: list[_Item]) -> tuple[np.ndarray, int]:
        """Packs queued reports into one record array; also returns how many were dropped
        because their id cannot be a sample id."""
        if not items:
            return np.empty(0, dtype=RECORD_DTYPE), 0
        if len(items) == 1:
            it = items[0]
            ids, losses, kept = it.ids, it.losses, it.kept
            step: Any = np.full(len(it), it.step, dtype=np.uint32)
            epoch: Any = np.full(len(it), it.epoch, dtype=np.uint16)
        else:
            counts = [len(it) for it in items]
            ids = np.concatenate([it.ids for it in items])
            losses = np.concatenate([it.losses for it in items])
            kept = np.concatenate([it.kept for it in items])
            step = np.repeat(np.array([it.step for it in items], dtype=np.uint32), counts)
            epoch = np.repeat(np.array([it.epoch for it in items], dtype=np.uint16), counts)
        records, dropped = pack_dropping_bad_ids(ids, losses, kept, step, epoch, self.rank)
        if dropped:
            log.warning("loss reporter %s/%d: dropped %d record(s) with ids outside [0, 2**32)",
                        self.run, self.rank, dropped)
        return records, dropped

    def _spill_memory(self) -> None:
        frames = []
        while self._mem_records:
            recs, dropped = self._pack(self._take_items(self.max_batch_records))
            self._invalid += dropped
            if len(recs):
                frames.append((self._next_seq(), recs.tobytes()))
        try:
            self._spill.append(frames)
            self._spilled += sum(len(p) // RECORD_SIZE for _, p in frames)
        except SpillFull:
            # Bounded disk beats a full one: these records are lost, and said to be.
            lost = sum(len(p) // RECORD_SIZE for _, p in frames)
            self._overflow += lost
            log.error("loss reporter %s/%d: spill file %s is at its cap of %d bytes: dropped "
                      "%d records", self.run, self.rank, self._spill.path, self._spill.max_bytes,
                      lost)
            return
        now = time.monotonic()
        if now - self._last_spill_log > 10.0:
            self._last_spill_log = now
            log.warning("loss reporter %s/%d: over %d buffered records (Redis slow or "
                        "unreachable: %s), spilling to %s", self.run, self.rank,
                        self.max_buffer_records, self._error or "no error yet",
                        self._spill.path)

    def _adopt_orphans(self, frames: list[tuple[int, bytes]]) -> None:
        # Spill files left by an earlier reporter of this run and rank: their frames keep their
        # numbers (lower than ours), so resending them is safe even if some were delivered.
        if frames:
            if frames[-1][0] >= self._first_seq:
                raise ReporterError(
                    f"spill files {self._orphans} hold sequence numbers above this reporter's "
                    "start (clock went backwards?): pass seq_start"
                )
            self._spill.rewrite(frames)
            n = self._spill.pending_records
            self._reported += n
            log.warning("loss reporter %s/%d: resending %d records from %d old spill file(s)",
                        self.run, self.rank, n, len(self._orphans))
        for path in self._orphans:
            if path != self._spill.path:
                path.unlink(missing_ok=True)

    def _persist_all(self) -> None:
        """Rewrites the spill file as: replays, in-flight batch, unsent frames, memory."""
        frames: list[tuple[int, bytes]] = [(b.seq, b.payload) for b in self._replay]
        if self._inflight is not None and not self._inflight.from_spill:
            frames.append((self._inflight.seq, self._inflight.payload))
        frames += self._spill.unsent()
        while self._mem_records:
            recs, dropped = self._pack(self._take_items(self.max_batch_records))
            self._invalid += dropped
            if len(recs):
                frames.append((self._next_seq(), recs.tobytes()))
        self._spill.rewrite(frames)
        self._inflight = None
        self._replay.clear()

    # -- the sender thread -----------------------------------------------------------------

    def _send_wait(self) -> float | None:
        """Seconds until the sender should send (0: now), or None when there is nothing."""
        if self._inflight is not None or self._replay or self._spill.has_unsent:
            return 0.0
        if not self._mem_records:
            self._urgent = False
            return None
        if (self._mem_records >= self.max_batch_records or self._flushing or self._closing
                or self._urgent):
            return 0.0
        return max(0.0, self._mem_since + self.linger_s - time.monotonic())

    def _next_batch(self) -> _Batch | None:
        """A batch to resend, else the in-flight batch, else the next spilled frame, else None
        (under the lock)."""
        if self._replay:
            return self._replay[0]
        if self._inflight is None and self._spill.has_unsent:
            seq, payload, nxt = self._spill.read(self._spill.read_offset)
            self._inflight = _Batch(seq, payload, len(payload) // RECORD_SIZE, True, nxt)
        return self._inflight

    def _batch_from_memory(self) -> _Batch | None:
        """Packs the oldest queued reports into the in-flight batch, off the lock.

        Called only when nothing is in flight or spilled. The records count as pending
        (`_packing`) while out of the queue, and the batch number is taken before the lock is
        let go, so anything spilled meanwhile is numbered after it.
        """
        with self._cond:
            items = self._take_items(self.max_batch_records)
            n = sum(len(it) for it in items)
            self._packing += n
            seq = self._next_seq()
        records, dropped, payload = np.empty(0, dtype=RECORD_DTYPE), 0, b""
        try:
            records, dropped = self._pack(items)
            payload = records.tobytes()
        finally:
            with self._cond:
                self._packing -= n
                if not payload and n and not dropped:
                    # Packing failed: put the reports back, at the front, to be tried again.
                    self._mem.extendleft(reversed(items))
                    self._mem_records += n
        with self._cond:
            self._invalid += dropped
            if len(records):
                self._inflight = _Batch(seq, payload, len(records))
            self._cond.notify_all()
            return self._inflight

    def _delivered_batch(self, batch: _Batch, appended: bool) -> None:
        now = time.monotonic()
        if self._replay and batch is self._replay[0]:
            self._replay.popleft()
            self._replayed += 1
        else:
            self._delivered += batch.records
            if appended:
                self._delivered_batches += 1
            else:
                self._duplicates += 1
            if batch.from_spill:
                self._spill.sent(batch.next_offset, batch.records)
            self._inflight = None
        batch.delivered_at = now
        self._acked = batch.seq if self._acked is None else max(self._acked, batch.seq)
        self._recent.append(batch)
        while self._recent and now - self._recent[0].delivered_at > self.replay_window_s:
            self._recent.popleft()
        self._error = None
        self._cond.notify_all()

    def _queue_lost_batches(self, last: int) -> None:
        """Queues the recent batches the store lost (those after `last`) to be sent first."""
        with self._cond:
            self._acked = last if last >= 0 else None
            lost = [b for b in self._recent if b.seq > last]
            self._recent = deque(b for b in self._recent if b.seq <= last)
            queued = {b.seq for b in self._replay}
            lost = [b for b in lost if b.seq not in queued]
            if lost:
                log.warning("loss reporter %s/%d: the store lost %d delivered batch(es) (Redis "
                            "restarted?): sending them again", self.run, self.rank, len(lost))
                self._replay.extendleft(reversed(lost))
                self._replay = deque(sorted(self._replay, key=lambda b: b.seq))

    def _prepare(self) -> None:
        """Registers (or checks) the run and checks sequence numbers have not gone back."""
        if self.num_samples is not None:
            self._store.register_run(self.run, self.num_samples, self.ema_decay)
        last = self._store.last_seq(self.run, self.rank)
        self._store.run_info(self.run)  # UnknownRunError if not registered
        if last is not None and last >= self._first_seq:
            raise ReporterError(
                f"run {self.run} rank {self.rank} already has batch seq {last} >= this "
                f"reporter's start {self._first_seq} (clock went backwards, or two reporters "
                "share a rank?): pass seq_start"
            )
        self._ready = True

    def _run(self) -> None:
        backoff = 0.02
        while True:
            with self._cond:
                if self._mem_records > self.max_buffer_records:
                    self._spill_memory()  # Redis down, or slower than the producer
                batch = None
                while self._ready and not self._closing:
                    wait = self._send_wait()
                    if wait == 0.0:
                        batch = self._next_batch()
                        break
                    self._cond.wait(0.5 if wait is None else wait)
                if self._closing:
                    return  # flush() already waited; close() persists the rest
            try:
                if not self._ready:
                    self._prepare()
                    continue
                if batch is None:
                    batch = self._batch_from_memory()
                    if batch is None:
                        continue  # every record had a bad id
                batch.attempts += 1
                replay = bool(self._replay) and batch is self._replay[0]
                appended = self._store.ingest(self.run, self.rank, batch.seq, batch.payload,
                                              after=None if replay else self._acked,
                                              attempt=self.attempt)
                if (not appended and batch.attempts == 1 and batch.seq >= self._first_seq
                        and not replay):
                    # Our own batch, never sent before, yet the store has a later one from
                    # this rank: a second reporter is using it, and its batches would hide ours.
                    raise ReporterError(
                        f"run {self.run} rank {self.rank}: the store already has a batch "
                        f"numbered above {batch.seq}: another reporter is using this rank"
                    )
                with self._cond:
                    self._delivered_batch(batch, appended)
                backoff = 0.02
            except LostBatchesError as e:
                if batch is not None:
                    batch.attempts -= 1  # not sent: the next try is its first
                self._queue_lost_batches(e.last)
            except UnknownRunError as e:
                if self.num_samples is not None:
                    # Registered before, gone now (Redis lost its data): register again, and
                    # send again what it lost.
                    self._ready = False
                    continue
                self._set_fatal(e)
                return
            except (StoreError, ReporterError, SpillError) as e:
                self._set_fatal(e)
                return
            except Exception as e:
                if _transient(e):
                    with self._cond:
                        self._error = f"{type(e).__name__}: {e}"
                        self._cond.wait(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                # A bug must stop delivery loudly, not kill it silently.
                log.exception("loss reporter %s/%d: unexpected error", self.run, self.rank)
                self._set_fatal(e)
                return

    def _set_fatal(self, e: Exception) -> None:
        with self._cond:
            self._fatal = f"{type(e).__name__}: {e}"
            self._cond.notify_all()
        log.error("loss reporter %s/%d stopped: %s", self.run, self.rank, e)
