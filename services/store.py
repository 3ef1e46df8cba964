"""The Redis loss store: runs, an append-only log of packed loss records, and table snapshots.

Key layout (all keys of a run share the hash tag `{run}`, so a run lives on one cluster slot);
docs/store.md explains it in full:

| key                                 | type   | holds                                           |
|-------------------------------------|--------|-------------------------------------------------|
| `hb:runs`                           | set    | names of registered runs                        |
| `hb:{RUN}:meta`                     | hash   | size, decay, ingest counters, consumer counters, |
|                                     |        | current snapshot pointer                        |
| `hb:{RUN}:seq`                      | hash   | rank -> last accepted batch sequence number     |
| `hb:{RUN}:log`                      | stream | one entry per packed batch: r, s, i, d          |
| `hb:{RUN}:snap:{GEN}:{FIELD}:{K}`   | string | chunk K of one table field (2**20 samples)      |
| `hb:{RUN}:snapgens`                 | set    | snapshot generations that may have chunks       |

Ingest is one Lua script, so "append only if this (rank, seq) is new" is atomic: a batch that
is retried after a lost reply, or replayed from a spill file, is counted as a duplicate and not
appended again. Every appended entry gets a dense index `i` (1, 2, 3, ...), which lets a consumer
notice a gap (entries trimmed under it) instead of silently skipping records.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from hardbatch.sampler.hardness import (
    DEFAULT_DECAY,
    FIELD_DTYPES,
    FIELDS,
    MAX_SAMPLES,
    HardnessTable,
)
from hardbatch.sampler.records import RECORD_DTYPE, RECORD_SIZE, to_bytes

RUNS_KEY = "hb:runs"
CHUNK_SAMPLES = 1 << 20  # 4 MiB per field chunk: well under Redis's 512 MB string limit
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

# Consumer counters a materializer publishes (absolute values, so replicas agree).
CONSUMER_FIELDS = (
    "consumed_entries", "consumed_records", "rejected_out_of_range", "rejected_nonfinite",
)


class StoreError(ValueError):
    """Bad request to the store (unknown run, size mismatch, malformed batch)."""


class UnknownRunError(StoreError):
    """The run was never registered (or was deleted)."""


class RunSizeMismatchError(StoreError):
    """A run was registered again with a different dataset size or decay."""


def meta_key(run: str) -> str:
    return f"hb:{{{run}}}:meta"


def seq_key(run: str) -> str:
    return f"hb:{{{run}}}:seq"


def log_key(run: str) -> str:
    return f"hb:{{{run}}}:log"


def snapgens_key(run: str) -> str:
    return f"hb:{{{run}}}:snapgens"


def snap_key(run: str, gen: int, field_name: str, chunk: int) -> str:
    return f"hb:{{{run}}}:snap:{gen}:{field_name}:{chunk}"


def check_run_name(run: str) -> str:
    if not isinstance(run, str) or not RUN_NAME.match(run):
        raise StoreError(
            f"bad run name {run!r}: use 1-128 letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )
    return run


# KEYS: meta, runs. ARGV: run, num_samples, ema_decay, retain_log, now.
_REGISTER = """
local cur = redis.call('HGET', KEYS[1], 'num_samples')
if cur then
  local dec = redis.call('HGET', KEYS[1], 'ema_decay')
  if cur ~= ARGV[2] or dec ~= ARGV[3] then
    return redis.error_reply('SIZE_MISMATCH run ' .. ARGV[1] .. ' has num_samples=' .. cur ..
      ' ema_decay=' .. dec .. ', not num_samples=' .. ARGV[2] .. ' ema_decay=' .. ARGV[3])
  end
  return 0
end
redis.call('HSET', KEYS[1], 'num_samples', ARGV[2], 'ema_decay', ARGV[3],
  'retain_log', ARGV[4], 'created_at', ARGV[5], 'entries', 0, 'records', 0,
  'duplicate_batches', 0, 'snap_gen', 0, 'snap_entries', 0, 'snap_id', '0-0')
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# KEYS: meta, seq, log. ARGV: rank, seq, payload, record_size.
# Returns 1 (appended) or 0 (duplicate: this rank already delivered seq or a later one).
_INGEST = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('UNKNOWN_RUN')
end
local rs = tonumber(ARGV[4])
local nbytes = string.len(ARGV[3])
if nbytes % rs ~= 0 then
  redis.call('HINCRBY', KEYS[1], 'malformed_batches', 1)
  return redis.error_reply('MALFORMED payload of ' .. nbytes .. ' bytes')
end
local seq = tonumber(ARGV[2])
local last = redis.call('HGET', KEYS[2], ARGV[1])
if last and tonumber(last) >= seq then
  redis.call('HINCRBY', KEYS[1], 'duplicate_batches', 1)
  return 0
end
local i = redis.call('HINCRBY', KEYS[1], 'entries', 1)
redis.call('XADD', KEYS[3], '*', 'r', ARGV[1], 's', ARGV[2], 'i', i, 'd', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'records', nbytes / rs)
return 1
"""

# KEYS: meta, log. ARGV: gen, snap_id, snap_entries, trim_min_id, now, then consumer
# counter name/value pairs. Makes the new snapshot current unless it is stale: a generation
# that is not newer than the current one, or a position behind it. Generations only ever grow,
# so every generation below the current one is garbage (see LossStore._collect_garbage).
# Returns 1 if it became current, else 0.
_COMMIT_SNAPSHOT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('UNKNOWN_RUN')
end
local cur = tonumber(redis.call('HGET', KEYS[1], 'snap_entries') or '0')
local old = tonumber(redis.call('HGET', KEYS[1], 'snap_gen') or '0')
if tonumber(ARGV[1]) <= old or tonumber(ARGV[3]) < cur then
  return 0
end
redis.call('HSET', KEYS[1], 'snap_gen', ARGV[1], 'snap_id', ARGV[2], 'snap_entries', ARGV[3],
  'snap_at', ARGV[5])
for j = 6, #ARGV, 2 do
  redis.call('HSET', KEYS[1], 'snap_' .. ARGV[j], ARGV[j + 1])
end
if redis.call('HGET', KEYS[1], 'retain_log') == '0' and ARGV[4] ~= '' then
  redis.call('XTRIM', KEYS[2], 'MINID', ARGV[4])
  redis.call('HSET', KEYS[1], 'trimmed_entries', ARGV[3])
end
return 1
"""


@dataclass(frozen=True)
class RunInfo:
    """What the store knows about a run.

    Attributes:
        run: name.
        num_samples: dataset size N (ids 0..N-1).
        ema_decay: decay of the moving average every consumer uses.
        retain_log: whether snapshots leave the log untrimmed (for `export --log`).
        created_at: registration time (unix seconds).
        entries: batches appended to the log so far.
        records: loss records in those batches.
        duplicate_batches: batches refused because their (rank, seq) was already delivered.
        malformed_batches: batches refused because they were not whole records.
        consumed_entries / consumed_records: how far the materializer has read.
        rejected_out_of_range / rejected_nonfinite: records it refused to apply.
        lag_records: records appended but not yet consumed.
        log_entries: entries still held in the log stream (older ones are in the snapshot).
        snapshot_entries: log entries covered by the current snapshot.
        ranks: last accepted sequence number per rank.
    """

    run: str
    num_samples: int
    ema_decay: float
    retain_log: bool
    created_at: float
    entries: int
    records: int
    duplicate_batches: int
    malformed_batches: int
    consumed_entries: int
    consumed_records: int
    rejected_out_of_range: int
    rejected_nonfinite: int
    lag_records: int
    log_entries: int
    snapshot_entries: int
    ranks: dict[int, int] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return self.rejected_out_of_range + self.rejected_nonfinite

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["rejected"] = self.rejected
        return d


@dataclass(frozen=True)
class LogEntry:
    """One batch from the log: stream id, sender rank and seq, dense index, packed payload."""

    id: str
    rank: int
    seq: int
    index: int
    payload: bytes


@dataclass(frozen=True)
class Snapshot:
    """A table snapshot read back from Redis, and where in the log it stands."""

    table: HardnessTable
    stream_id: str
    entries: int
    counters: dict[str, int]


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def next_stream_id(stream_id: str) -> str:
    """The smallest stream id after `stream_id` (for XTRIM MINID, which keeps >= MINID)."""
    ms, seq = stream_id.split("-")
    return f"{ms}-{int(seq) + 1}"


class LossStore:
    """Typed access to the loss store in one Redis database.

    Thread-safe as far as the redis client is (redis-py clients are: they pool connections).

    Args:
        client: a redis-py client; responses may be bytes (decode_responses=False is assumed
            for payloads, and is what `LossStore.from_url` makes).
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._register = client.register_script(_REGISTER)
        self._ingest = client.register_script(_INGEST)
        self._commit = client.register_script(_COMMIT_SNAPSHOT)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> LossStore:
        """A store on a new client for `url` (redis://, rediss:// or unix://)."""
        return cls(redis.Redis.from_url(url, decode_responses=False, **kwargs))

    # -- runs ------------------------------------------------------------------------------

    def register_run(self, run: str, num_samples: int, ema_decay: float = DEFAULT_DECAY,
                     retain_log: bool = False) -> bool:
        """Registers a run, or checks an existing one has the same size and decay.

        Returns:
            True if the run was new.

        Raises:
            StoreError: bad name or size.
            RunSizeMismatchError: the run exists with another num_samples or ema_decay.
        """
        check_run_name(run)
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
            raise StoreError(f"num_samples must be an int, got {num_samples!r}")
        if not 0 < int(num_samples) <= MAX_SAMPLES:
            raise StoreError(f"num_samples must be in [1, {MAX_SAMPLES}], got {num_samples}")
        if not 0.0 <= float(ema_decay) < 1.0:
            raise StoreError(f"ema_decay must be in [0, 1), got {ema_decay}")
        try:
            created = self._register(
                keys=[meta_key(run), RUNS_KEY],
                args=[run, int(num_samples), repr(float(ema_decay)), int(bool(retain_log)),
                      repr(time.time())],
            )
        except redis.ResponseError as e:
            if "SIZE_MISMATCH" in str(e):
                raise RunSizeMismatchError(str(e).split("SIZE_MISMATCH ", 1)[-1]) from None
            raise
        return bool(created)

    def runs(self) -> list[str]:
        """Names of registered runs, sorted."""
        members: Any = self.client.smembers(RUNS_KEY)
        return sorted(_s(r) for r in members)

    def _meta(self, run: str) -> dict[str, str]:
        check_run_name(run)
        raw: Any = self.client.hgetall(meta_key(run))
        if not raw:
            raise UnknownRunError(f"unknown run {run!r}: register it first")
        return {_s(k): _s(v) for k, v in raw.items()}

    def num_samples(self, run: str) -> int:
        return int(self._meta(run)["num_samples"])

    def run_info(self, run: str) -> RunInfo:
        """Counters and settings of a run. Raises UnknownRunError."""
        meta = self._meta(run)
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(seq_key(run))
        pipe.xlen(log_key(run))
        seqs, xlen = pipe.execute()

        def num(k: str) -> int:
            return int(meta.get(k, 0))

        return RunInfo(
            run=run,
            num_samples=num("num_samples"),
            ema_decay=float(meta["ema_decay"]),
            retain_log=meta.get("retain_log") == "1",
            created_at=float(meta.get("created_at", 0.0)),
            entries=num("entries"),
            records=num("records"),
            duplicate_batches=num("duplicate_batches"),
            malformed_batches=num("malformed_batches"),
            consumed_entries=num("consumed_entries"),
            consumed_records=num("consumed_records"),
            rejected_out_of_range=num("rejected_out_of_range"),
            rejected_nonfinite=num("rejected_nonfinite"),
            lag_records=num("records") - num("consumed_records"),
            log_entries=int(xlen),
            snapshot_entries=num("snap_entries"),
            ranks={int(_s(k)): int(_s(v)) for k, v in seqs.items()},
        )

    def delete_run(self, run: str) -> None:
        """Removes a run and all its keys (no error if it does not exist)."""
        check_run_name(run)
        keys = [meta_key(run), seq_key(run), log_key(run), snapgens_key(run)]
        keys += list(self.client.scan_iter(match=f"hb:{{{run}}}:snap:*", count=1000))
        self.client.unlink(*keys)
        self.client.srem(RUNS_KEY, run)

    # -- ingest ----------------------------------------------------------------------------

    def last_seq(self, run: str, rank: int) -> int | None:
        """The last batch sequence number accepted from `rank`, or None."""
        v = self.client.hget(seq_key(check_run_name(run)), str(int(rank)))
        return None if v is None else int(_s(v))

    def ingest(self, run: str, rank: int, seq: int, payload: bytes) -> bool:
        """Appends one packed batch unless `(run, rank, seq)` was already delivered.

        A rank must deliver its batches in increasing `seq` order: a batch whose seq is not
        greater than the last accepted one is treated as a duplicate.

        Returns:
            True if appended, False if it was a duplicate (already applied: not an error).

        Raises:
            UnknownRunError: the run is not registered.
            StoreError: the payload is not a whole number of records, or bad rank/seq.
        """
        check_run_name(run)
        if isinstance(rank, bool) or not 0 <= int(rank) < 2**16:
            raise StoreError(f"rank must be in [0, 65535], got {rank}")
        # Lua numbers are doubles: keep seq exact.
        if isinstance(seq, bool) or not 0 <= int(seq) < 2**53:
            raise StoreError(f"seq must be in [0, 2**53), got {seq}")
        try:
            appended = self._ingest(
                keys=[meta_key(run), seq_key(run), log_key(run)],
                args=[int(rank), int(seq), payload, RECORD_SIZE],
            )
        except redis.ResponseError as e:
            msg = str(e)
            if "UNKNOWN_RUN" in msg:
                raise UnknownRunError(f"unknown run {run!r}: register it first") from None
            if "MALFORMED" in msg:
                raise StoreError(msg) from None
            raise
        return bool(appended)

    def ingest_records(self, run: str, rank: int, seq: int, records: np.ndarray) -> bool:
        """`ingest` for a RECORD_DTYPE array."""
        return self.ingest(run, rank, seq, to_bytes(records))

    # -- the log ---------------------------------------------------------------------------

    def read_log(self, run: str, after_id: str = "0-0", count: int = 1024,
                 block_ms: int | None = None) -> list[LogEntry]:
        """Up to `count` log entries after stream id `after_id`, oldest first.

        Args:
            block_ms: wait up to this long for new entries when there are none (None: no wait).
        """
        resp: Any = self.client.xread({log_key(run): after_id}, count=count, block=block_ms)
        if not resp:
            return []
        _, items = resp[0]
        return [
            LogEntry(
                id=_s(eid),
                rank=int(f[b"r"]),
                seq=int(f[b"s"]),
                index=int(f[b"i"]),
                payload=f[b"d"],
            )
            for eid, f in items
        ]

    def iter_log(self, run: str, batch: int = 1024) -> Iterator[LogEntry]:
        """Every entry still in the log, oldest first."""
        after = "0-0"
        while True:
            entries = self.read_log(run, after, count=batch)
            if not entries:
                return
            yield from entries
            after = entries[-1].id

    def log_records(self, run: str) -> np.ndarray:
        """All records still in the log as one RECORD_DTYPE array (for export)."""
        payloads = [e.payload for e in self.iter_log(run)]
        if not payloads:
            return np.empty(0, dtype=RECORD_DTYPE)
        return np.frombuffer(b"".join(payloads), dtype=RECORD_DTYPE)

    def first_log_index(self, run: str) -> int | None:
        """The dense index of the oldest entry still in the log, or None if it is empty."""
        entries = self.client.xrange(log_key(run), count=1)
        if not entries:
            return None
        return int(entries[0][1][b"i"])  # type: ignore[index]

    def publish_consumer(self, run: str, counters: dict[str, int]) -> None:
        """Records how far a materializer has read (absolute values, idempotent)."""
        self.client.hset(meta_key(run), mapping={k: int(v) for k, v in counters.items()})

    # -- snapshots -------------------------------------------------------------------------

    def write_snapshot(self, run: str, arrays: dict[str, np.ndarray], stream_id: str,
                       entries: int, counters: dict[str, int]) -> bool:
        """Stores a table snapshot taken after log entry `stream_id` (dense index `entries`).

        The chunks go under a new generation; one script then makes it current (unless a
        newer or further-along snapshot already is) and trims the log up to it unless the run
        retains its log; then every older generation's chunks are deleted, including ones left
        by a writer that died half way.

        Returns:
            True if this snapshot became the current one.
        """
        meta = self._meta(run)
        size = int(meta["num_samples"])
        gen_raw: Any = self.client.hincrby(meta_key(run), "snap_gen_counter", 1)
        gen = int(gen_raw)
        # Listed before any chunk is written, so a writer that dies half way leaves keys that
        # the next snapshot's garbage collection finds.
        self.client.sadd(snapgens_key(run), gen)
        pipe = self.client.pipeline(transaction=False)
        for name in FIELDS:
            arr = arrays[name]
            if arr.shape != (size,) or arr.dtype != FIELD_DTYPES[name]:
                raise StoreError(f"snapshot field {name}: {arr.dtype}{arr.shape} for size {size}")
            for k, start in enumerate(range(0, size, CHUNK_SAMPLES)):
                pipe.set(snap_key(run, gen, name, k), arr[start:start + CHUNK_SAMPLES].tobytes())
            pipe.execute()
        trim = next_stream_id(stream_id) if stream_id != "0-0" else ""
        args: list[Any] = [gen, stream_id, int(entries), trim, repr(time.time())]
        for name, value in counters.items():
            args += [name, int(value)]
        committed = bool(self._commit(keys=[meta_key(run), log_key(run)], args=args))
        if not committed:
            self._delete_generation(run, gen, size)
        self._collect_garbage(run, size)
        return committed

    def _delete_generation(self, run: str, gen: int, size: int) -> None:
        nchunks = -(-size // CHUNK_SAMPLES)
        keys = [snap_key(run, gen, f, k) for f in FIELDS for k in range(nchunks)]
        self.client.unlink(*keys)
        self.client.srem(snapgens_key(run), gen)

    def _collect_garbage(self, run: str, size: int) -> None:
        """Deletes every snapshot generation older than the current one."""
        cur_raw: Any = self.client.hget(meta_key(run), "snap_gen")
        current = int(cur_raw or 0)
        gens: Any = self.client.smembers(snapgens_key(run))
        for g in sorted(int(x) for x in gens):
            if g < current:
                self._delete_generation(run, g, size)

    def load_snapshot(self, run: str) -> Snapshot | None:
        """The current snapshot of a run, or None if none was taken yet."""
        for _ in range(5):
            found, snap = self._try_load_snapshot(run)
            if found:
                return snap
        raise StoreError(f"run {run!r}: snapshot chunks are missing")

    def _try_load_snapshot(self, run: str) -> tuple[bool, Snapshot | None]:
        """(True, snapshot or None), or (False, None) if it was replaced while being read."""
        meta = self._meta(run)
        gen = int(meta.get("snap_gen", 0))
        if gen == 0:
            return True, None
        size = int(meta["num_samples"])
        nchunks = -(-size // CHUNK_SAMPLES)
        pipe = self.client.pipeline(transaction=False)
        for name in FIELDS:
            for k in range(nchunks):
                pipe.get(snap_key(run, gen, name, k))
        blobs = pipe.execute()
        arrays: dict[str, np.ndarray] = {}
        for j, name in enumerate(FIELDS):
            parts = blobs[j * nchunks:(j + 1) * nchunks]
            if any(p is None for p in parts):
                # A newer snapshot replaced this one between reading meta and the chunks.
                return False, None
            arrays[name] = np.frombuffer(b"".join(parts), dtype=FIELD_DTYPES[name])
        counters = {k: int(meta.get("snap_" + k, 0)) for k in CONSUMER_FIELDS}
        table = HardnessTable.from_arrays(
            arrays, float(meta["ema_decay"]),
            applied=counters["consumed_records"] - counters["rejected_out_of_range"]
            - counters["rejected_nonfinite"],
        )
        return True, Snapshot(table, meta["snap_id"], int(meta["snap_entries"]), counters)
