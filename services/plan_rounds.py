"""Composed rounds, shared by every rank of a round and kept in Redis across restarts.

The first rank to ask for round r of a run (at a given world size) composes it for all ranks
from the run's current priorities; the others, and any later or restarted service, get the same
ids back. A round is one Redis string `hb:{RUN}:round:{INCARNATION}:{WORLD}:{ROUND}` (the
incarnation is the run's registration time, so a run deleted and registered again under the
same name never gets the old run's rounds):

    4-byte little-endian header length | JSON header | ids | weights

with ids as little-endian u32 (u64 for tables past 2**32 samples) and weights as f32, both in
(rank, batch, position) order: 8 bytes per id, so a round of 8 ranks x 64 x 256 takes 1 MiB.
It is written with SET NX (the first writer wins, so two replicas cannot hand out different
rounds) and expires after `plan_ttl_s`. Rounds do not pile up: once every rank of a round has
fetched it, it expires `plan_grace_s` later (long enough for a worker group that restarts to
fetch the same round again), and a run keeps at most `max_rounds` rounds (the oldest go).
A small in-memory LRU saves the round trip for the other ranks of a round.

Round r is composed from the losses of rounds < r, all of them: the workers ask for it once
they have trained round r-1 (`after_losses`), and the service waits (up to `wait_s`) until
its table holds a record of every sample round r-1 trained. Nothing of round r exists yet, so
the table it composes from is the same in every run of one seed: the plans are reproducible.
A round whose predecessor's losses do not all arrive in time (a user loop that reports only
some batches, records lost with a worker) is composed from what is there and counted
(`LiveRun.rounds_composed_early`).
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from collections import OrderedDict

import numpy as np
import redis
from hardbatch.sampler.plans import SKIP, RoundPlan, compose_round, validate_round_shape
from hardbatch.services import keys
from hardbatch.services.live_runs import LiveRun

log = logging.getLogger(__name__)

# KEYS: fetched set, round. ARGV: rank, world_size, grace_s, ttl_s.
# Notes that `rank` has the round; once all ranks have it, the round expires after grace_s.
_FETCHED = """
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local left = redis.call('TTL', KEYS[2])
  if left < 0 or left > tonumber(ARGV[3]) then
    redis.call('EXPIRE', KEYS[2], ARGV[3])
  end
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 1
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 0
"""

# KEYS: rounds zset. ARGV: round key, round number, max_rounds.
# Lists a new round; deletes the oldest rounds past max_rounds. Returns how many it deleted.
_LIST_ROUND = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local n = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if n <= 0 then return 0 end
local old = redis.call('ZRANGE', KEYS[1], 0, n - 1)
for _, k in ipairs(old) do redis.call('UNLINK', k) end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - 1)
return #old
"""


class RoundConflictError(ValueError):
    """The round exists with another shape than the request asks for."""


def pack_round(plan: RoundPlan, num_samples: int) -> bytes:
    id_dtype = "<u4" if num_samples <= 2**32 else "<u8"
    header = json.dumps({
        "round": plan.round, "world_size": plan.world_size, "batches": plan.batches,
        "batch_size": plan.batch_size, "uniform": plan.uniform, "version": plan.version,
        "id_dtype": id_dtype, "asked": plan.asked,
    }).encode()
    return b"".join([
        struct.pack("<I", len(header)), header,
        plan.ids.astype(id_dtype).tobytes(), plan.weights.astype("<f4").tobytes(),
    ])


def unpack_round(blob: bytes) -> RoundPlan:
    (hlen,) = struct.unpack_from("<I", blob, 0)
    h = json.loads(blob[4:4 + hlen])
    shape = (h["world_size"], h["batches"], h["batch_size"])
    count = int(np.prod(shape))
    id_dtype = np.dtype(h["id_dtype"])
    ids = np.frombuffer(blob, dtype=id_dtype, count=count, offset=4 + hlen)
    weights = np.frombuffer(blob, dtype="<f4", count=count,
                            offset=4 + hlen + count * id_dtype.itemsize)
    return RoundPlan(
        ids=ids.astype(np.int64).reshape(shape), weights=weights.reshape(shape),
        round=h["round"], world_size=h["world_size"], uniform=h["uniform"],
        version=h["version"], asked=h.get("asked", 0),
    )


class RoundStore:
    """Gets or composes rounds of every run.

    Args:
        client: Redis client (bytes responses).
        ttl_s: lifetime of a stored round.
        cache_rounds: rounds kept in memory.
        grace_s: lifetime of a round once every rank has fetched it.
        max_rounds: rounds a run keeps in Redis (the oldest are deleted).
        wait_s: how long composing round r waits for round r-1's losses (below the workers'
            request timeout, 10 s by default).
    """

    def __init__(self, client: redis.Redis, ttl_s: int, cache_rounds: int, grace_s: int = 3600,
                 max_rounds: int = 16, wait_s: float = 5.0) -> None:
        self.client = client
        self.wait_s = wait_s
        self.ttl_s = ttl_s
        self.cache_rounds = cache_rounds
        self.grace_s = grace_s
        self.max_rounds = max_rounds
        self._fetched = client.register_script(_FETCHED)
        self._list_round = client.register_script(_LIST_ROUND)
        self._cache: OrderedDict[tuple[str, str, int, int], RoundPlan] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._key_locks: dict[tuple[str, str, int, int], threading.Lock] = {}

    def get(self, run: LiveRun, *, round_: int, world_size: int, batches: int,
            batch_size: int, rank: int | None = None,
            after_losses: bool = False) -> tuple[RoundPlan, bool]:
        """The round, composed now if nobody composed it before.

        Args:
            rank: the rank asking, noted so that the round expires once all ranks have it.
            after_losses: compose it only once the previous round's losses are all in (up to
                `wait_s`); the workers that stream their losses ask so.

        Returns:
            (round, composed_here).

        Raises:
            ValueError: a round larger than the table.
            RoundConflictError: the round exists with other batches or batch size.
            redis.RedisError: Redis unreachable.
        """
        validate_round_shape(run.num_samples, world_size, batches, batch_size)
        key = (run.run, run.incarnation, world_size, round_)
        composed = False
        plan = self._cached(key)
        if plan is None:
            with self._lock_for(key):
                plan = self._cached(key)
                if plan is None:
                    plan, composed = self._load_or_compose(run, key, batches, batch_size,
                                                           after_losses)
                    self._remember(key, plan)
        if (plan.asked, plan.batch_size) != (batches, batch_size):
            raise RoundConflictError(
                f"round {round_} of run {run.run!r} for world size {world_size} was composed "
                f"for {plan.asked} batches x {plan.batch_size}; this request asks for "
                f"{batches} x {batch_size} (all ranks of a round must ask for the same shape)"
            )
        if rank is not None:
            self._fetched(keys=[keys.fetched(*key), keys.round_(*key)],
                          args=[rank, world_size, self.grace_s, self.ttl_s])
        return plan, composed

    def _load_or_compose(self, run: LiveRun, key: tuple[str, str, int, int], batches: int,
                         batch_size: int, after_losses: bool) -> tuple[RoundPlan, bool]:
        rkey = keys.round_(*key)
        blob = self.client.get(rkey)
        if blob is not None:
            return unpack_round(blob), False  # type: ignore[arg-type]
        if after_losses and key[3] > 0:
            self._await_previous(run, key)
        snap = run.priority_snapshot(current=True)
        seed = run.seed if snap.config.seed is None else snap.config.seed
        plan = compose_round(snap, seed=seed, round_=key[3], world_size=key[2],
                             batches=batches, batch_size=batch_size)
        if self.client.set(rkey, pack_round(plan, snap.n), nx=True, ex=self.ttl_s):
            self._list_round(keys=[keys.rounds(run.run)], args=[rkey, key[3], self.max_rounds])
            return plan, True
        # Another replica stored this round first: its plan is the round.
        blob = self.client.get(rkey)
        if blob is None:  # expired in between: ours is as good as any
            return plan, True
        return unpack_round(blob), False  # type: ignore[arg-type]

    def _await_previous(self, run: LiveRun, key: tuple[str, str, int, int]) -> None:
        """Waits until the table holds round r-1's losses (when round r-1 is known here)."""
        prev = (*key[:3], key[3] - 1)
        plan = self._cached(prev)
        if plan is None:
            blob = self.client.get(keys.round_(*prev))
            if blob is None:  # never composed (a fallback round, a new world size): no wait
                return
            plan = unpack_round(blob)  # type: ignore[arg-type]
        trained = int(np.count_nonzero(plan.weights != SKIP))
        if not run.await_round(prev[3], trained, self.wait_s):
            run.rounds_composed_early += 1
            log.warning("run %s: round %d composed before all of round %d's losses arrived "
                        "(waited %.1f s)", run.run, key[3], prev[3], self.wait_s)

    def _cached(self, key: tuple[str, str, int, int]) -> RoundPlan | None:
        with self._cache_lock:
            plan = self._cache.get(key)
            if plan is not None:
                self._cache.move_to_end(key)
            return plan

    def _remember(self, key: tuple[str, str, int, int], plan: RoundPlan) -> None:
        with self._cache_lock:
            self._cache[key] = plan
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_rounds:
                old, _ = self._cache.popitem(last=False)
                self._key_locks.pop(old, None)

    def _lock_for(self, key: tuple[str, str, int, int]) -> threading.Lock:
        with self._cache_lock:
            lock = self._key_locks.get(key)
            if lock is None:
                lock = self._key_locks[key] = threading.Lock()
                if len(self._key_locks) > 4 * self.cache_rounds + 64:
                    # Locks of rounds that failed (never cached) would otherwise pile up.
                    for k in list(self._key_locks)[: len(self._key_locks) // 2]:
                        if k != key and k not in self._cache:
                            self._key_locks.pop(k, None)
            return lock
