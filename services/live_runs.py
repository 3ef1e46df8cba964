"""The runs the service answers for: one materializer per run, kept current in the background.

Each `LiveRun` owns a `Materializer` (its own thread applies the run's loss log to an in-memory
`HardnessTable`). One refresher thread for all runs discovers newly registered runs and, at most
every `refresh_s`, rebuilds what is too costly to compute per request over a 10M-sample table:
the plan priorities (`PrioritySnapshot`) and the run statistics (quantiles, kept fraction).
Requests read the table under the materializer's lock, or those precomputed snapshots.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
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


class RunNotReadyError(RuntimeError):
    """The run exists but its table is still loading."""


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


class LiveRun:
    """One run's materialized table and what is derived from it.

    Args:
        store: the loss store.
        run: run name.
        plan_config: the run's plan config.
        snapshot_interval_s: how often the materializer snapshots the table to Redis.
    """

    def __init__(self, store: LossStore, run: str, plan_config: PlanConfig,
                 snapshot_interval_s: float) -> None:
        self.store = store
        self.run = run
        self.seed = run_seed(run)
        self.plan_config = plan_config
        self._snapshot_interval_s = snapshot_interval_s
        self.materializer: Materializer | None = None
        self.error: str | None = None
        self.stats = RunStats()
        self.priorities: PrioritySnapshot | None = None
        self.suspect_threshold: float | None = None
        self.created_at: float | None = None
        self.last_world_size: int | None = None
        self.last_round: int | None = None
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
        self.error = None
        try:
            self.created_at = self.store.run_info(self.run).created_at
            m = Materializer(self.store, self.run, snapshot_interval_s=self._snapshot_interval_s)
            m.catch_up(timeout_s=600)
            self.materializer = m
            # Built before the run counts as ready, so no plan request pays for it.
            self.refresh_priorities()
            m.start()
            self._ready.set()
        except (StoreError, redis.RedisError, TimeoutError, ValueError) as e:
            self.materializer = None
            self.error = f"{type(e).__name__}: {e}"
            log.warning("run %s failed to load: %s", self.run, self.error)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

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

    def priority_snapshot(self) -> PrioritySnapshot:
        """The latest plan priorities; built now if none is there or the config changed."""
        snap = self.priorities
        if snap is not None and snap.config == self.plan_config:
            return snap
        return self.refresh_priorities(force=True)

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
                version = m.table.applied
            rule = cfg.suspect_rule()
            suspect = None
            if rule is not None:
                self.suspect_threshold = rule.threshold(suspect_reference(ema, seen))
                suspect = rule.mask(seen, ema, last_loss, self.suspect_threshold)
            else:
                self.suspect_threshold = None
            snap = PrioritySnapshot.build(hardness, seen, cfg, version=version, suspect=suspect)
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
    """All runs of one store, discovered and refreshed by one background thread.

    Args:
        store: the loss store.
        default_config: plan config for runs that set none.
        refresh_s: period of discovery and of priority/stat rebuilds.
        snapshot_interval_s: passed to each run's materializer.
    """

    def __init__(self, store: LossStore, default_config: PlanConfig, refresh_s: float,
                 snapshot_interval_s: float) -> None:
        self.store = store
        self.default_config = default_config
        self.refresh_s = refresh_s
        self.snapshot_interval_s = snapshot_interval_s
        self._runs: dict[str, LiveRun] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.redis_ok = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="live-runs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            runs = list(self._runs.values())
        for r in runs:
            r.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.refresh_once()
            self._stop.wait(self.refresh_s)

    def refresh_once(self) -> None:
        """Discovers new runs and rebuilds stale priorities and stats (errors are logged)."""
        try:
            names = set(self.store.runs())
            for name in names:
                self._ensure(name)
            with self._lock:
                loaded = list(self._runs.values())
            # Deleted, or deleted and registered again under the same name.
            gone = [r for r in loaded if r.run not in names or (
                r.created_at is not None
                and self.store.run_info(r.run).created_at != r.created_at)]
            with self._lock:
                for r in gone:
                    if self._runs.get(r.run) is r:
                        del self._runs[r.run]
            for r in gone:
                log.info("run %s was deleted or replaced in the store; reloading", r.run)
                r.stop(final_snapshot=False)
            self.redis_ok = True
        except redis.RedisError as e:
            self.redis_ok = False
            log.warning("run discovery failed: %s", e)
        with self._lock:
            runs = list(self._runs.values())
        for r in runs:
            if r.error is not None:
                r.retry_load()
            if not r.ready or self._stop.is_set():
                continue
            try:
                r.refresh_stats()
                r.refresh_priorities()
            except (ValueError, RunNotReadyError) as e:
                log.warning("run %s: refresh failed: %s", r.run, e)

    def _ensure(self, name: str) -> LiveRun:
        with self._lock:
            run = self._runs.get(name)
            if run is None:
                run = LiveRun(self.store, name, self.load_plan_config(name),
                              self.snapshot_interval_s)
                self._runs[name] = run
            return run

    def get(self, name: str) -> LiveRun:
        """The run by name, started on first use.

        Raises:
            UnknownRunError: no such run in the store.
            StoreError: a malformed run name.
        """
        with self._lock:
            run = self._runs.get(name)
        if run is not None:
            return run
        check_run_name(name)
        if name not in self.store.runs():
            raise UnknownRunError(f"unknown run {name!r}")
        return self._ensure(name)

    def names(self) -> list[str]:
        with self._lock:
            known = set(self._runs)
        return sorted(known | set(self.store.runs()))

    def loaded(self) -> list[LiveRun]:
        with self._lock:
            return list(self._runs.values())

    # -- per-run plan config, kept in Redis so every replica and restart agrees ---------------

    def load_plan_config(self, name: str) -> PlanConfig:
        raw = self.store.client.hgetall(plan_config_key(name))
        if not raw:
            return self.default_config
        fields: dict[str, Any] = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes)
                                                           else v)
            for k, v in raw.items()
        }
        try:
            return plan_config_from_strings(fields)
        except (ValueError, TypeError) as e:
            log.warning("run %s: stored plan config is invalid (%s); using defaults", name, e)
            return self.default_config

    def set_plan_config(self, name: str, cfg: PlanConfig) -> None:
        run = self.get(name)
        key = plan_config_key(name)
        pipe = self.store.client.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping=plan_config_to_strings(cfg))  # type: ignore[arg-type]
        pipe.execute()
        run.plan_config = cfg


def plan_config_key(run: str) -> str:
    return f"hb:{{{run}}}:plan_config"


def plan_config_to_strings(cfg: PlanConfig) -> dict[str, str]:
    return {
        "alpha": repr(cfg.alpha), "lam": repr(cfg.lam), "eps": repr(cfg.eps),
        "beta": repr(cfg.beta), "anneal_frac": repr(cfg.anneal_frac),
        "total_rounds": "" if cfg.total_rounds is None else str(cfg.total_rounds),
        "hardness": cfg.hardness, "strata": str(cfg.strata),
        "suspect_scorings": str(cfg.suspect_scorings),
        "suspect_factor": repr(cfg.suspect_factor), "suspect_floor": repr(cfg.suspect_floor),
    }


def plan_config_from_strings(d: dict[str, str]) -> PlanConfig:
    # Fields added later fall back to the defaults, so configs stored before still load.
    default = PlanConfig()
    return PlanConfig(
        alpha=float(d["alpha"]), lam=float(d["lam"]), eps=float(d["eps"]),
        beta=float(d["beta"]), anneal_frac=float(d["anneal_frac"]),
        total_rounds=int(d["total_rounds"]) if d.get("total_rounds") else None,
        hardness=d["hardness"], strata=int(d.get("strata", default.strata)),
        suspect_scorings=int(d.get("suspect_scorings", default.suspect_scorings)),
        suspect_factor=float(d.get("suspect_factor", default.suspect_factor)),
        suspect_floor=float(d.get("suspect_floor", default.suspect_floor)),
    )
