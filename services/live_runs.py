"""The runs the service answers for: materialized tables, kept current in the background.

Each loaded `LiveRun` owns a `Materializer` (its in-memory `HardnessTable`). Two threads serve
every run, however many there are:

- the reader: one blocking read over the logs of all loaded runs (`LossStore.read_logs`),
  each run's new entries applied to its table, and a snapshot of a run written back every
  `snapshot_interval_s`. Redis errors are retried with backoff, counted, and shown per run in
  `/readyz` until a retry works; a run whose log cannot be followed any more (entries lost with
  no snapshot covering them) is marked failed and loaded again from scratch.
- the refresher: every `refresh_s`, discovers runs registered since, drops deleted or replaced
  ones, evicts runs nobody asked for in `idle_evict_s` (the next request loads them again),
  reads every run's plan config through from Redis (so a change made through any replica
  reaches all of them), and rebuilds what is too costly to compute per request over a
  10M-sample table: the plan priorities (`PrioritySnapshot`) and the run statistics.

Tables load in a small pool of loader threads. Requests read a table under the materializer's
lock, or those precomputed snapshots.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from hardbatch.sampler.hardness import SuspectRule, suspect_reference
from hardbatch.sampler.plans import PlanConfig, PrioritySnapshot
from hardbatch.services.materializer import Materializer
from hardbatch.services.store import LossStore, StoreError, UnknownRunError, check_run_name

log = logging.getLogger(__name__)

QUANTILES = (0.5, 0.9, 0.99)
LOADERS = 4  # tables loading at once


class RunNotReadyError(RuntimeError):
    """The run exists but its table is still loading (or failed to and is retried)."""


@dataclass(frozen=True)
class RunStats:
    """Statistics of a run's table, recomputed every refresh.

    Attributes:
        version: table version they were computed at (records applied).
        seen_samples: samples scored at least once.
        scored: records applied (sum of times seen).
        kept: of those, records the filter kept.
        quantiles: quantile -> moving-average hardness over seen samples.
        ingest_rate: records applied per second since the previous refresh.
        computed_at: unix time.
    """

    version: int = -1
    seen_samples: int = 0
    scored: int = 0
    kept: int = 0
    quantiles: dict[float, float] = field(default_factory=dict)
    ingest_rate: float = 0.0
    computed_at: float = 0.0

    @property
    def kept_fraction(self) -> float | None:
        return self.kept / self.scored if self.scored else None


def run_seed(run: str) -> int:
    """A stable seed from the run name (the same in every process, unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(run.encode(), digest_size=8).digest(), "little") >> 1


class BackgroundErrors:
    """Counts of errors the background threads hit, by component and kind (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, component: str, e: BaseException) -> None:
        with self._lock:
            self.counts[(component, type(e).__name__)] += 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self.counts)


class LiveRun:
    """One run's materialized table and what is derived from it.

    Args:
        store: the loss store.
        run: run name.
        plan_config: the run's plan config.
        snapshot_interval_s: how often the reader snapshots the table to Redis.
        loaders: bounds how many tables load at once.
        read_config: reads the run's plan config through from Redis (before each compose).
    """

    def __init__(self, store: LossStore, run: str, plan_config: PlanConfig,
                 snapshot_interval_s: float, loaders: threading.Semaphore,
                 read_config: Callable[[], PlanConfig] | None = None) -> None:
        self.store = store
        self.run = run
        self.seed = run_seed(run)
        self.plan_config = plan_config
        self._read_config = read_config
        self.snapshot_interval_s = snapshot_interval_s
        self.materializer: Materializer | None = None
        self.error: str | None = None  # why the table is not loaded
        self.stall: str | None = None  # the reader's last error on this run, until it recovers
        self.stats = RunStats()
        self.priorities: PrioritySnapshot | None = None
        self.suspect_threshold: float | None = None
        self.created_at: float | None = None
        self.last_world_size: int | None = None
        self.last_round: int | None = None
        self.rounds_composed_early = 0  # before the previous round's losses were all in
        self.last_used = time.monotonic()
        self.last_snapshot = time.monotonic()
        self._loaders = loaders
        self._build_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._ready = threading.Event()
        self._loader = threading.Thread(target=self._load, name=f"load-{run}", daemon=True)
        self._loader.start()

    def retry_load(self) -> None:
        """Starts loading again after a failed load (e.g. Redis was down)."""
        if self.ready or self._loader.is_alive():
            return
        self._loader = threading.Thread(target=self._load, name=f"load-{self.run}", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        with self._loaders:
            self.error = None
            try:
                self.created_at = self.store.run_info(self.run).created_at
                m = Materializer(self.store, self.run, snapshot_interval_s=None)
                m.catch_up(timeout_s=600)
                self.materializer = m
                # Built before the run counts as ready, so no plan request pays for it.
                self.refresh_priorities()
                self.last_snapshot = time.monotonic()
                self._ready.set()
            except (StoreError, redis.RedisError, TimeoutError, ValueError) as e:
                self.materializer = None
                self.error = f"{type(e).__name__}: {e}"
                log.warning("run %s failed to load: %s", self.run, self.error)

    def fail(self, e: BaseException) -> None:
        """The table cannot follow the log any more: unload it (the refresher reloads it)."""
        self._ready.clear()
        self.materializer = None
        self.error = f"{type(e).__name__}: {e}"
        log.error("run %s: %s; loading its table again", self.run, self.error)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def state(self) -> str:
        """ready, loading, or `error: ...` (what /readyz shows)."""
        if self.ready and self.stall is None:
            return "ready"
        why = self.stall or self.error
        return f"error: {why}" if why else "loading"

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)

    def mat(self) -> Materializer:
        """The materializer, or RunNotReadyError while the table loads."""
        m = self.materializer
        if m is None:
            why = f" ({self.error})" if self.error else ""
            raise RunNotReadyError(f"run {self.run!r} is still loading its table{why}")
        return m

    @property
    def num_samples(self) -> int:
        return self.mat().table.size

    def version(self) -> int:
        m = self.mat()
        with m.lock:
            return m.table.applied

    def priority_snapshot(self, current: bool = False) -> PrioritySnapshot:
        """The latest plan priorities under the config Redis has now (a change made through
        another replica counts at once); rebuilt if none is there or the config changed, and
        with `current` also if the table changed since (what a round is composed from)."""
        if self._read_config is not None:
            self.plan_config = self._read_config()
        snap = self.priorities
        if snap is not None and snap.config == self.plan_config:
            return self.refresh_priorities() if current else snap
        return self.refresh_priorities(force=True)

    def await_round(self, round_: int, trained: int, timeout_s: float) -> bool:
        """Waits until `trained` samples have round `round_` as their latest scoring (each
        sample a round trains gets one record of it); False if `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        counted_at, got = -1, 0
        while True:
            m = self.mat()
            with m.lock:
                if m.table.applied != counted_at:  # count again only when records came in
                    counted_at = m.table.applied
                    got = int(np.count_nonzero((m.table.last_round == round_ % 2**16)
                                               & (m.table.seen > 0)))
            if got >= trained:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)

    def refresh_priorities(self, force: bool = False) -> PrioritySnapshot:
        """Rebuilds the plan priorities from the table if it changed since the last build."""
        with self._build_lock:
            m = self.mat()
            cfg = self.plan_config
            snap = self.priorities
            version = self.version()
            if (not force and snap is not None and snap.version == version
                    and snap.config == cfg):
                return snap
            with m.lock:
                # Copies, so the build runs without holding up ingestion.
                ema = m.table.ema.copy()
                last_loss = m.table.last_loss.copy()
                hardness = ema if cfg.hardness == "ema" else last_loss
                seen = m.table.seen.copy()
                last_round = m.table.last_round.copy()
                version = m.table.applied
            rule = cfg.suspect_rule()
            suspect = None
            threshold = None
            if rule is not None:
                threshold = rule.threshold(suspect_reference(ema, seen))
                suspect = rule.mask(seen, ema, last_loss, threshold, last_round)
                if not rule.engaged(suspect, seen):  # too few to tell from hard samples
                    suspect, threshold = None, None
            self.suspect_threshold = threshold
            snap = PrioritySnapshot.build(hardness, seen, cfg, version=version, suspect=suspect,
                                          last_loss=last_loss)
            self.priorities = snap
            return snap

    def suspect_rule(self) -> tuple[SuspectRule, float] | None:
        """The noise guard's rule and its loss threshold as of the last priority build, or
        None when the run's plan config turns it off."""
        snap = self.priorities
        if snap is None or snap.config != self.plan_config:
            self.priority_snapshot()  # the config changed: its threshold too
        rule, threshold = self.plan_config.suspect_rule(), self.suspect_threshold
        if rule is None or threshold is None:
            return None
        return rule, threshold

    def refresh_stats(self) -> RunStats:
        """Recomputes quantiles and kept fraction when the table changed."""
        with self._stats_lock:
            return self._refresh_stats()

    def _refresh_stats(self) -> RunStats:
        m = self.mat()
        old = self.stats
        with m.lock:
            version = m.table.applied
            if version == old.version:
                return old
            seen = m.table.seen
            seen_mask = seen > 0
            scored = int(seen.sum(dtype=np.uint64))
            kept = int(m.table.kept.sum(dtype=np.uint64))
            ema = m.table.ema[seen_mask]
        now = time.time()
        qs: list[float] = np.quantile(ema, QUANTILES).tolist() if len(ema) else []
        rate = 0.0
        if old.computed_at and now > old.computed_at and version >= old.version >= 0:
            rate = (version - old.version) / (now - old.computed_at)
        self.stats = RunStats(
            version=version, seen_samples=int(len(ema)), scored=scored, kept=kept,
            quantiles={q: float(v) for q, v in zip(QUANTILES, qs, strict=False)},
            ingest_rate=rate, computed_at=now,
        )
        return self.stats

    @property
    def incarnation(self) -> str:
        """Tells this run apart from an earlier run of the same name (deleted, registered again)."""
        return f"{int((self.created_at or 0.0) * 1e6)}"

    def stop(self, final_snapshot: bool = True) -> None:
        m = self.materializer
        if m is not None:
            m.stop(timeout_s=5.0, final_snapshot=final_snapshot)


class LiveRuns:
    """All runs of one store, discovered, read and refreshed by two background threads.

    Args:
        store: the loss store.
        default_config: plan config for runs that set none.
        refresh_s: period of discovery and of priority/stat rebuilds.
        snapshot_interval_s: how often a run's table is snapshotted to Redis.
        idle_evict_s: unload a run's table when no request used it this long.
        read_block_ms: how long the reader's one blocking read waits for new entries.
        read_count: log entries read per run per read.
    """

    def __init__(self, store: LossStore, default_config: PlanConfig, refresh_s: float,
                 snapshot_interval_s: float, idle_evict_s: float = 900.0,
                 read_block_ms: int = 200, read_count: int = 16) -> None:
        self.store = store
        self.default_config = default_config
        self.refresh_s = refresh_s
        self.snapshot_interval_s = snapshot_interval_s
        self.idle_evict_s = idle_evict_s
        self.read_block_ms = read_block_ms
        self.read_count = read_count
        self.errors = BackgroundErrors()
        self.reader_error: str | None = None
        self._runs: dict[str, LiveRun] = {}
        self._evicted: set[str] = set()  # loaded again on demand only, not by discovery
        self._lock = threading.Lock()
        self._loaders = threading.Semaphore(LOADERS)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.redis_ok = False

    def start(self) -> None:
        for target, name in ((self._refresh_loop, "live-runs"), (self._read_loop, "log-reader")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        with self._lock:
            runs = list(self._runs.values())
        for r in runs:
            r.stop()

    # -- the reader: one blocking read for every run ----------------------------------------

    def _read_loop(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            runs = {r.run: r for r in self.loaded() if r.ready}
            if not runs:
                self._stop.wait(0.05)
                continue
            try:
                self.read_once(runs)
                backoff = 0.05
                self.reader_error = None
            except redis.RedisError as e:
                self.errors.add("reader", e)
                self.reader_error = f"{type(e).__name__}: {e}"
                log.warning("log reader: %s (retrying in %.2f s)", e, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def read_once(self, runs: dict[str, LiveRun]) -> None:
        """One read over the logs of `runs`; applies what came and takes due snapshots."""
        positions = {}
        for name, r in runs.items():
            m = r.materializer
            if m is not None:
                positions[name] = m.last_id
        got = self.store.read_logs(positions, count=self.read_count, block_ms=self.read_block_ms)
        now = time.monotonic()
        for name, r in runs.items():
            m = r.materializer
            if m is None:
                continue
            try:
                if name in got:
                    m.apply(got[name])
                m.publish_pending()
                if now - r.last_snapshot >= r.snapshot_interval_s:
                    r.last_snapshot = now
                    m.snapshot()
                r.stall = None
            except redis.RedisError as e:
                # E.g. out of memory: nothing is lost (the log still has the entries, the
                # counters are absolute); it is retried on the next read and shown meanwhile.
                self.errors.add("materializer", e)
                r.stall = f"{type(e).__name__}: {e}"
                log.warning("run %s: %s (retrying)", name, r.stall)
            except StoreError as e:  # the log cannot be followed: start this run over
                self.errors.add("materializer", e)
                r.fail(e)

    # -- the refresher ----------------------------------------------------------------------

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            self.refresh_once()
            self._stop.wait(self.refresh_s)

    def refresh_once(self) -> None:
        """Discovers, drops and evicts runs, reads plan configs, rebuilds priorities and stats
        (errors are logged and counted)."""
        try:
            names = set(self.store.runs())
            with self._lock:
                self._evicted &= names
                new = names - set(self._runs) - self._evicted
            for name in new:
                self._ensure(name)
            self._drop_gone(names)
            self._evict_idle()
            self._read_plan_configs()
            self.redis_ok = True
        except redis.RedisError as e:
            self.redis_ok = False
            self.errors.add("refresher", e)
            log.warning("run discovery failed: %s", e)
        for r in self.loaded():
            if r.error is not None and not r.ready:
                r.retry_load()
            if not r.ready or self._stop.is_set():
                continue
            try:
                r.refresh_stats()
                r.refresh_priorities()
            except (ValueError, RunNotReadyError) as e:
                log.warning("run %s: refresh failed: %s", r.run, e)

    def _drop_gone(self, names: set[str]) -> None:
        """Unloads runs deleted from the store, or deleted and registered again."""
        loaded = self.loaded()
        created = self.store.created_at([r.run for r in loaded])
        gone = [r for r in loaded if r.run not in names or (
            r.created_at is not None and created[r.run] != r.created_at)]
        self._unload(gone, final_snapshot=False)
        for r in gone:
            log.info("run %s was deleted or replaced in the store", r.run)

    def _evict_idle(self) -> None:
        now = time.monotonic()
        idle = [r for r in self.loaded() if r.ready and now - r.last_used > self.idle_evict_s]
        self._unload(idle, final_snapshot=True)
        with self._lock:
            self._evicted |= {r.run for r in idle}
        for r in idle:
            log.info("run %s: idle for %.0f s, table unloaded", r.run, now - r.last_used)

    def _unload(self, runs: list[LiveRun], final_snapshot: bool) -> None:
        with self._lock:
            for r in runs:
                if self._runs.get(r.run) is r:
                    del self._runs[r.run]
        for r in runs:
            r.stop(final_snapshot=final_snapshot)

    def _read_plan_configs(self) -> None:
        loaded = self.loaded()
        stored = self.store.plan_configs([r.run for r in loaded])
        for r in loaded:
            r.plan_config = self._config_from(r.run, stored[r.run])

    def _ensure(self, name: str) -> LiveRun:
        with self._lock:
            run = self._runs.get(name)
        if run is not None:
            return run
        cfg = self.plan_config(name)
        with self._lock:
            run = self._runs.get(name)
            if run is None:
                run = LiveRun(self.store, name, cfg, self.snapshot_interval_s, self._loaders,
                              lambda: self.plan_config(name))
                self._runs[name] = run
                self._evicted.discard(name)
            return run

    def get(self, name: str) -> LiveRun:
        """The run by name, loaded on first use (or again after eviction).

        Raises:
            UnknownRunError: no such run in the store.
            StoreError: a malformed run name.
        """
        with self._lock:
            run = self._runs.get(name)
        if run is None:
            check_run_name(name)
            if not self.store.has_run(name):
                raise UnknownRunError(f"unknown run {name!r}")
            run = self._ensure(name)
        run.last_used = time.monotonic()
        return run

    def forget(self, name: str) -> None:
        """Unloads a run deleted from the store (no final snapshot: its keys are gone)."""
        with self._lock:
            run = self._runs.get(name)
            self._evicted.discard(name)
        if run is not None:
            self._unload([run], final_snapshot=False)

    def names(self) -> list[str]:
        with self._lock:
            known = set(self._runs)
        return sorted(known | set(self.store.runs()))

    def loaded(self) -> list[LiveRun]:
        with self._lock:
            return list(self._runs.values())

    # -- per-run plan config, kept in Redis so every replica and restart agrees ---------------

    def plan_config(self, name: str) -> PlanConfig:
        """The run's plan config as Redis has it now (read through, never cached)."""
        return self._config_from(name, self.store.plan_configs([name])[name])

    def _config_from(self, name: str, fields: dict[str, str]) -> PlanConfig:
        if not fields:
            return self.default_config
        try:
            return plan_config_from_strings(fields)
        except (ValueError, TypeError, KeyError) as e:
            log.warning("run %s: stored plan config is invalid (%s); using defaults", name, e)
            return self.default_config

    def set_plan_config(self, name: str, cfg: PlanConfig) -> None:
        run = self.get(name)
        self.store.set_plan_config(name, plan_config_to_strings(cfg))
        run.plan_config = cfg


def plan_config_to_strings(cfg: PlanConfig) -> dict[str, str]:
    return {
        "alpha": repr(cfg.alpha), "lam": repr(cfg.lam), "eps": repr(cfg.eps),
        "beta": repr(cfg.beta), "anneal_frac": repr(cfg.anneal_frac),
        "total_rounds": "" if cfg.total_rounds is None else str(cfg.total_rounds),
        "hardness": cfg.hardness, "priority": cfg.priority, "strata": str(cfg.strata),
        "suspect_scorings": str(cfg.suspect_scorings),
        "suspect_factor": repr(cfg.suspect_factor), "suspect_floor": repr(cfg.suspect_floor),
        "suspect_min_share": repr(cfg.suspect_min_share),
        "size_factor": repr(cfg.size_factor), "size_mass": repr(cfg.size_mass),
        "size_min": repr(cfg.size_min), "packed": str(int(cfg.packed)),
        "seed": "" if cfg.seed is None else str(cfg.seed),
    }


def plan_config_from_strings(d: dict[str, Any]) -> PlanConfig:
    # Fields added later fall back to the defaults, so configs stored before still load.
    default = PlanConfig()
    return PlanConfig(
        alpha=float(d["alpha"]), lam=float(d["lam"]), eps=float(d["eps"]),
        beta=float(d["beta"]), anneal_frac=float(d["anneal_frac"]),
        total_rounds=int(d["total_rounds"]) if d.get("total_rounds") else None,
        hardness=d["hardness"], priority=d.get("priority", default.priority),
        strata=int(d.get("strata", default.strata)),
        suspect_scorings=int(d.get("suspect_scorings", default.suspect_scorings)),
        suspect_factor=float(d.get("suspect_factor", default.suspect_factor)),
        suspect_floor=float(d.get("suspect_floor", default.suspect_floor)),
        suspect_min_share=float(d.get("suspect_min_share", default.suspect_min_share)),
        size_factor=float(d.get("size_factor", default.size_factor)),
        size_mass=float(d.get("size_mass", default.size_mass)),
        size_min=float(d.get("size_min", default.size_min)),
        packed=bool(int(d.get("packed", int(default.packed)))),
        seed=int(d["seed"]) if d.get("seed") else None,
    )
