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
rounds) and expires after `plan_ttl_s`. A small in-memory LRU saves the round trip for the
other ranks of a round.
"""

from __future__ import annotations

import json
import struct
import threading
from collections import OrderedDict

import numpy as np
import redis
from hardbatch.sampler.plans import RoundPlan, compose_round, validate_round_shape
from hardbatch.services.live_runs import LiveRun


class RoundConflictError(ValueError):
    """The round exists with another shape than the request asks for."""


def round_key(run: str, incarnation: str, world_size: int, round_: int) -> str:
    return f"hb:{{{run}}}:round:{incarnation}:{world_size}:{round_}"


def pack_round(plan: RoundPlan, num_samples: int) -> bytes:
    id_dtype = "<u4" if num_samples <= 2**32 else "<u8"
    header = json.dumps({
        "round": plan.round, "world_size": plan.world_size, "batches": plan.batches,
        "batch_size": plan.batch_size, "uniform": plan.uniform, "version": plan.version,
        "id_dtype": id_dtype,
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
        version=h["version"],
    )


class RoundStore:
    """Gets or composes rounds of every run.

    Args:
        client: Redis client (bytes responses).
        ttl_s: lifetime of a stored round.
        cache_rounds: rounds kept in memory.
    """

    def __init__(self, client: redis.Redis, ttl_s: int, cache_rounds: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.cache_rounds = cache_rounds
        self._cache: OrderedDict[tuple[str, str, int, int], RoundPlan] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._key_locks: dict[tuple[str, str, int, int], threading.Lock] = {}

    def get(self, run: LiveRun, *, round_: int, world_size: int, batches: int,
            batch_size: int) -> tuple[RoundPlan, bool]:
        """The round, composed now if nobody composed it before.

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
                    plan, composed = self._load_or_compose(run, key, batches, batch_size)
                    self._remember(key, plan)
        if (plan.batches, plan.batch_size) != (batches, batch_size):
            raise RoundConflictError(
                f"round {round_} of run {run.run!r} for world size {world_size} was composed "
                f"with {plan.batches} batches x {plan.batch_size}; this request asks for "
                f"{batches} x {batch_size} (all ranks of a round must ask for the same shape)"
            )
        return plan, composed

    def _load_or_compose(self, run: LiveRun, key: tuple[str, str, int, int], batches: int,
                         batch_size: int) -> tuple[RoundPlan, bool]:
        rkey = round_key(*key)
        blob = self.client.get(rkey)
        if blob is not None:
            return unpack_round(blob), False  # type: ignore[arg-type]
        snap = run.priority_snapshot()
        plan = compose_round(snap, seed=run.seed, round_=key[3], world_size=key[2],
                             batches=batches, batch_size=batch_size)
        if self.client.set(rkey, pack_round(plan, snap.n), nx=True, ex=self.ttl_s):
            return plan, True
        # Another replica stored this round first: its plan is the round.
        blob = self.client.get(rkey)
        if blob is None:  # expired in between: ours is as good as any
            return plan, True
        return unpack_round(blob), False  # type: ignore[arg-type]

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

    def forget(self, run: str) -> None:
        """Drops a run's rounds from memory (Redis copies expire on their own)."""
        with self._cache_lock:
            for k in [k for k in self._cache if k[0] == run]:
                del self._cache[k]
