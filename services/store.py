"""The Redis loss store: runs, an append-only log of packed loss records, and table snapshots.

Key names are in `hardbatch.services.keys`; docs/store.md explains the layout.

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
from hardbatch.services import keys

CHUNK_SAMPLES = 1 << 20  # 4 MiB per field chunk: well under Redis's 512 MB string limit
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

# Consumer counters a materializer publishes (absolute values, so replicas agree).
CONSUMER_FIELDS = (
    "consumed_entries", "consumed_records", "rejected_out_of_range", "rejected_nonfinite",
    "superseded_records", "confirmed_step", "max_step",
)


class StoreError(ValueError):
    """Bad request to the store (unknown run, size mismatch, malformed batch)."""


class UnknownRunError(StoreError):
    """The run was never registered (or was deleted)."""


class RunSizeMismatchError(StoreError):
    """A run was registered again with a different dataset size or decay."""


class LostBatchesError(StoreError):
    """The store is behind what it acknowledged to a sender (Redis restarted from an older
    append-only file): `last` is the last seq it holds from the rank (-1: none)."""

    def __init__(self, message: str, last: int) -> None:
        super().__init__(message)
        self.last = last


def _check_attempt(attempt: int) -> int:
    if isinstance(attempt, bool) or not 0 <= int(attempt) < 2**16:
        raise StoreError(f"attempt must be in [0, 65535], got {attempt}")
    return int(attempt)


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

# KEYS: meta, seq, log. ARGV: rank, seq, payload, record_size, after, attempt.
# Returns 1 (appended) or 0 (duplicate: this rank already delivered seq or a later one).
# `after` (or ''): the last seq the sender knows the store acknowledged; a store whose last seq
# for the rank is behind it lost batches (Redis restarted from an older file) and refuses the
# new one with LOST <its last seq>, so the sender can send the lost ones first, in order.
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
if ARGV[5] ~= '' and (not last or tonumber(last) < tonumber(ARGV[5])) then
  return redis.error_reply('LOST ' .. (last or '-1'))
end
local i = redis.call('HINCRBY', KEYS[1], 'entries', 1)
if ARGV[6] == nil or ARGV[6] == '' then
  redis.call('XADD', KEYS[3], '*', 'r', ARGV[1], 's', ARGV[2], 'i', i, 'd', ARGV[3])
else
  redis.call('XADD', KEYS[3], '*', 'r', ARGV[1], 's', ARGV[2], 'i', i, 'd', ARGV[3],
    'a', ARGV[6])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'records', nbytes / rs)
return 1
"""

# KEYS: meta, log, fences. ARGV: kind ('resume' or 'ckpt'), attempt, step.
# A marker entry in the log (no records), so every consumer meets it at the same position.
# resume: "attempt ARGV[2] continues from the checkpoint at step ARGV[3]": records of older
# attempts after that step are superseded. Idempotent; a different step for a known attempt
# is an error. ckpt: "a checkpoint at step ARGV[3] is persisted": no later resume can go back
# past it. Idempotent (a step not above the last confirmed one appends nothing).
_MARK = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('UNKNOWN_RUN')
end
local step = tonumber(ARGV[3])
if ARGV[1] == 'resume' then
  local cur = redis.call('HGET', KEYS[3], ARGV[2])
  if cur then
    if tonumber(cur) ~= step then
      return redis.error_reply('FENCE attempt ' .. ARGV[2] .. ' already resumed after step ' .. cur)
    end
    return 0
  end
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
else
  local last = tonumber(redis.call('HGET', KEYS[1], 'checkpoint_step') or '-1')
  if step <= last then
    return 0
  end
  redis.call('HSET', KEYS[1], 'checkpoint_step', ARGV[3])
end
local i = redis.call('HINCRBY', KEYS[1], 'entries', 1)
redis.call('XADD', KEYS[2], '*', 'r', 0, 's', 0, 'i', i, 'd', '', 'k', ARGV[1], 'a', ARGV[2],
  't', ARGV[3])
return 1
"""

# KEYS: meta. ARGV: field/value pairs. HSET only while the run exists, so a consumer that is
# still busy with a run just deleted cannot bring back a meta hash of counters alone.
_HSET_IF_RUN = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('UNKNOWN_RUN')
end
for j = 1, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1])
end
return 1
"""

# KEYS: meta, snapgens. The next snapshot generation, listed before any chunk is written.
_NEXT_GEN = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('UNKNOWN_RUN')
end
local gen = redis.call('HINCRBY', KEYS[1], 'snap_gen_counter', 1)
redis.call('SADD', KEYS[2], gen)
return gen
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
    """One entry of the log: stream id, sender rank and seq, dense index, packed payload.

    `attempt` tags the batches of a training attempt (None: untagged). A marker entry (no
    records) has `kind` 'resume' or 'ckpt' and the checkpoint `step` it is about.
    """

    id: str
    rank: int
    seq: int
    index: int
    payload: bytes
    attempt: int | None = None
    kind: str = ""
    step: int = 0


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
        self._hset_if_run = client.register_script(_HSET_IF_RUN)
        self._next_gen = client.register_script(_NEXT_GEN)
        self._mark = client.register_script(_MARK)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> LossStore:
        """A store on a new client for `url` (redis://, rediss:// or unix://); the password
        comes from $HARDBATCH_REDIS_PASSWORD when the URL has none."""
        from hardbatch.services.redis_server import with_password

        return cls(redis.Redis.from_url(with_password(url), decode_responses=False, **kwargs))

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
                keys=[keys.meta(run), keys.RUNS],
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
        members: Any = self.client.smembers(keys.RUNS)
        return sorted(_s(r) for r in members)

    def has_run(self, run: str) -> bool:
        return bool(self.client.sismember(keys.RUNS, check_run_name(run)))

    def _meta(self, run: str) -> dict[str, str]:
        check_run_name(run)
        raw: Any = self.client.hgetall(keys.meta(run))
        if not raw:
            raise UnknownRunError(f"unknown run {run!r}: register it first")
        return {_s(k): _s(v) for k, v in raw.items()}

    def num_samples(self, run: str) -> int:
        return int(self._meta(run)["num_samples"])

    def run_info(self, run: str) -> RunInfo:
        """Counters and settings of a run. Raises UnknownRunError."""
        meta = self._meta(run)
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(keys.seq(run))
        pipe.xlen(keys.log(run))
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

    def delete_run(self, run: str) -> int:
        """Removes a run and every key it has (plan config and rounds included).

        Returns:
            How many keys were removed (0 if the run did not exist).
        """
        check_run_name(run)
        self.client.srem(keys.RUNS, run)
        names = list(self.client.scan_iter(match=keys.run_pattern(run), count=1000))
        removed = 0
        for start in range(0, len(names), 1000):
            removed += int(self.client.unlink(*names[start:start + 1000]))
        return removed

    # -- ingest ----------------------------------------------------------------------------

    def last_seq(self, run: str, rank: int) -> int | None:
        """The last batch sequence number accepted from `rank`, or None."""
        v = self.client.hget(keys.seq(check_run_name(run)), str(int(rank)))
        return None if v is None else int(_s(v))

    def ingest(self, run: str, rank: int, seq: int, payload: bytes,
               after: int | None = None, attempt: int | None = None) -> bool:
        """Appends one packed batch unless `(run, rank, seq)` was already delivered.

        A rank must deliver its batches in increasing `seq` order: a batch whose seq is not
        greater than the last accepted one is treated as a duplicate.

        Args:
            after: the last seq the store acknowledged to this sender, if it wants to know
                when the store lost batches since (LostBatchesError instead of appending).
            attempt: the training attempt that scored these records (0, 1, ... for a
                Ray Train run restarted from checkpoints; see `resume`), or None.

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
                keys=[keys.meta(run), keys.seq(run), keys.log(run)],
                args=[int(rank), int(seq), payload, RECORD_SIZE,
                      "" if after is None else int(after),
                      "" if attempt is None else _check_attempt(attempt)],
            )
        except redis.ResponseError as e:
            msg = str(e)
            if msg.startswith("LOST "):
                last = int(msg.split()[1])
                raise LostBatchesError(
                    f"run {run!r} rank {rank}: the store holds batches up to seq {last}, not "
                    f"{after} as it acknowledged (Redis restarted from an older file?)",
                    last) from None
            if "UNKNOWN_RUN" in msg:
                raise UnknownRunError(f"unknown run {run!r}: register it first") from None
            if "MALFORMED" in msg:
                raise StoreError(msg) from None
            raise
        return bool(appended)

    def ingest_records(self, run: str, rank: int, seq: int, records: np.ndarray,
                       attempt: int | None = None) -> bool:
        """`ingest` for a RECORD_DTYPE array."""
        return self.ingest(run, rank, seq, to_bytes(records), attempt=attempt)

    # -- attempts: exactly once across restarts from checkpoints ----------------------------

    def new_attempt(self, run: str) -> int:
        """A number for a training attempt that is about to start (0, 1, 2, ...): greater than
        every number handed out before for the run, so a group that restarts from the same
        checkpoint twice still gets a new one. One rank asks and shares it with the others."""
        self._meta(run)
        return int(self.client.hincrby(keys.meta(run), "attempts", 1)) - 1

    def resume(self, run: str, attempt: int, step: int) -> bool:
        """Says that training attempt `attempt` continues from the checkpoint at `step`.

        Records of older attempts with a step above `step` are superseded (the new attempt
        trains those steps again): consumers drop them, and rebuild a table that already
        applied some. Idempotent: every rank of the attempt may call it.

        Returns:
            True if this call appended the marker, False if it was already there.

        Raises:
            StoreError: the attempt was already said to resume from another step.
        """
        return self._mark_entry(run, "resume", attempt, step)

    def checkpointed(self, run: str, attempt: int, step: int) -> bool:
        """Says that a checkpoint at `step` is persisted: no attempt will resume before it,
        so records up to `step` are final and consumers may snapshot them. Idempotent."""
        return self._mark_entry(run, "ckpt", attempt, step)

    def _mark_entry(self, run: str, kind: str, attempt: int, step: int) -> bool:
        check_run_name(run)
        if isinstance(step, bool) or not 0 <= int(step) < 2**32:
            raise StoreError(f"step must be in [0, 2**32), got {step}")
        try:
            return bool(self._run_script(
                self._mark, run, [keys.meta(run), keys.log(run), keys.fences(run)],
                [kind, _check_attempt(attempt), int(step)]))
        except redis.ResponseError as e:
            if "FENCE" in str(e):
                raise StoreError(str(e)) from None
            raise

    def fences(self, run: str) -> dict[int, int]:
        """attempt -> the checkpoint step it resumed from, for every resumed attempt."""
        raw: Any = self.client.hgetall(keys.fences(check_run_name(run)))
        return {int(_s(k)): int(_s(v)) for k, v in raw.items()}

    # -- the log ---------------------------------------------------------------------------

    def read_log(self, run: str, after_id: str = "0-0", count: int = 1024,
                 block_ms: int | None = None) -> list[LogEntry]:
        """Up to `count` log entries after stream id `after_id`, oldest first.

        Args:
            block_ms: wait up to this long for new entries when there are none (None: no wait).
        """
        return self.read_logs({run: after_id}, count, block_ms).get(run, [])

    def read_logs(self, positions: dict[str, str], count: int = 1024,
                  block_ms: int | None = None) -> dict[str, list[LogEntry]]:
        """Log entries of many runs in one call: run -> entries after its stream id.

        One connection serves every run, so a service reading hundreds of runs holds one
        blocking read, not hundreds. Runs with nothing new are left out.
        """
        if not positions:
            return {}
        streams = {keys.log(run): after for run, after in positions.items()}
        resp: Any = self.client.xread(streams, count=count, block=block_ms)  # type: ignore[arg-type]
        by_key = {keys.log(run): run for run in positions}
        out: dict[str, list[LogEntry]] = {}
        for stream, items in resp or []:
            out[by_key[_s(stream)]] = [
                LogEntry(id=_s(eid), rank=int(f[b"r"]), seq=int(f[b"s"]), index=int(f[b"i"]),
                         payload=f[b"d"],
                         attempt=int(f[b"a"]) if b"a" in f else None,
                         kind=_s(f.get(b"k", b"")), step=int(f.get(b"t", 0)))
                for eid, f in items
            ]
        return out

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
        entries = self.client.xrange(keys.log(run), count=1)
        if not entries:
            return None
        return int(entries[0][1][b"i"])  # type: ignore[index]

    def created_at(self, runs: list[str]) -> dict[str, float | None]:
        """Registration time of each run (None: not registered), in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for run in runs:
            pipe.hget(keys.meta(run), "created_at")
        return {run: None if v is None else float(_s(v))
                for run, v in zip(runs, pipe.execute(), strict=True)}

    # -- plan config: a hash every replica reads through, so a change reaches them all -------

    def plan_configs(self, runs: list[str]) -> dict[str, dict[str, str]]:
        """The stored plan-config fields of each run ({} where none was set), one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for run in runs:
            pipe.hgetall(keys.plan_config(run))
        return {run: {_s(k): _s(v) for k, v in raw.items()}
                for run, raw in zip(runs, pipe.execute(), strict=True)}

    def set_plan_config(self, run: str, fields: dict[str, str]) -> None:
        """Replaces the stored plan config of a registered run."""
        check_run_name(run)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(keys.plan_config(run))
        pipe.hset(keys.plan_config(run), mapping=fields)  # type: ignore[arg-type]
        pipe.execute()

    def publish_consumer(self, run: str, counters: dict[str, int]) -> None:
        """Records how far a materializer has read (absolute values, idempotent)."""
        args: list[Any] = []
        for k, v in counters.items():
            args += [k, int(v)]
        self._run_script(self._hset_if_run, run, [keys.meta(run)], args)

    def _run_script(self, script: Any, run: str, names: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=names, args=args)
        except redis.ResponseError as e:
            if "UNKNOWN_RUN" in str(e):
                raise UnknownRunError(f"unknown run {run!r} (deleted?)") from None
            raise

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
        # Listed before any chunk is written, so a writer that dies half way leaves keys that
        # the next snapshot's garbage collection finds.
        gen = int(self._run_script(self._next_gen, run, [keys.meta(run), keys.snapgens(run)], []))
        pipe = self.client.pipeline(transaction=False)
        for name in FIELDS:
            arr = arrays[name]
            if arr.shape != (size,) or arr.dtype != FIELD_DTYPES[name]:
                raise StoreError(f"snapshot field {name}: {arr.dtype}{arr.shape} for size {size}")
            for k, start in enumerate(range(0, size, CHUNK_SAMPLES)):
                pipe.set(keys.snap(run, gen, name, k), arr[start:start + CHUNK_SAMPLES].tobytes())
            pipe.execute()
        trim = next_stream_id(stream_id) if stream_id != "0-0" else ""
        args: list[Any] = [gen, stream_id, int(entries), trim, repr(time.time())]
        for name, value in counters.items():
            args += [name, int(value)]
        try:
            committed = bool(self._run_script(self._commit, run,
                                              [keys.meta(run), keys.log(run)], args))
        except UnknownRunError:
            # delete_run ran while the chunks were written: they came after its sweep.
            self._delete_generation(run, gen, size)
            raise
        if not committed:
            self._delete_generation(run, gen, size)
        self._collect_garbage(run, size)
        return committed

    def _delete_generation(self, run: str, gen: int, size: int) -> None:
        nchunks = -(-size // CHUNK_SAMPLES)
        names = [keys.snap(run, gen, f, k) for f in FIELDS for k in range(nchunks)]
        self.client.unlink(*names)
        self.client.srem(keys.snapgens(run), gen)

    def _collect_garbage(self, run: str, size: int) -> None:
        """Deletes every snapshot generation older than the current one."""
        cur_raw: Any = self.client.hget(keys.meta(run), "snap_gen")
        current = int(cur_raw or 0)
        gens: Any = self.client.smembers(keys.snapgens(run))
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
                pipe.get(keys.snap(run, gen, name, k))
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
            - counters["rejected_nonfinite"] - counters["superseded_records"],
        )
        return True, Snapshot(table, meta["snap_id"], int(meta["snap_entries"]), counters)
