"""Prometheus metrics of the service, rendered as the text exposition format by hand.

Per run: ingest counters, rate and lag (from the store and the materializer), plan request
latency (a histogram), kept fraction and hardness quantiles (from the refreshed run stats).
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

import redis
from hardbatch.services.live_runs import LiveRuns

PLAN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class PlanLatency:
    """A latency histogram of plan requests per run (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = defaultdict(lambda: [0] * (len(PLAN_BUCKETS_S) + 1))
        self._sums: dict[str, float] = defaultdict(float)
        self._errors: dict[tuple[str, int], int] = defaultdict(int)

    def observe(self, run: str, seconds: float) -> None:
        with self._lock:
            self._counts[run][bisect.bisect_left(PLAN_BUCKETS_S, seconds)] += 1
            self._sums[run] += seconds

    def error(self, run: str, status: int) -> None:
        with self._lock:
            self._errors[(run, status)] += 1

    def render(self) -> list[str]:
        out = [
            "# HELP hardbatch_plan_latency_seconds Time to answer a plan request.",
            "# TYPE hardbatch_plan_latency_seconds histogram",
        ]
        with self._lock:
            for run, counts in sorted(self._counts.items()):
                cum = 0
                for le, c in zip(PLAN_BUCKETS_S, counts, strict=False):
                    cum += c
                    out.append(f'hardbatch_plan_latency_seconds_bucket{{run="{run}",le="{le}"}} '
                               f"{cum}")
                cum += counts[-1]
                out.append(f'hardbatch_plan_latency_seconds_bucket{{run="{run}",le="+Inf"}} {cum}')
                out.append(f'hardbatch_plan_latency_seconds_sum{{run="{run}"}} '
                           f"{self._sums[run]:.6f}")
                out.append(f'hardbatch_plan_latency_seconds_count{{run="{run}"}} {cum}')
            out += [
                "# HELP hardbatch_plan_errors_total Plan requests refused (409, 422).",
                "# TYPE hardbatch_plan_errors_total counter",
            ]
            for (run, status), n in sorted(self._errors.items()):
                out.append(f'hardbatch_plan_errors_total{{run="{run}",status="{status}"}} {n}')
        return out


def _gauge(name: str, help_: str, rows: list[tuple[str, float | int | None]],
           kind: str = "gauge") -> list[str]:
    out = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    out += [f"{name}{{{labels}}} {value}" if labels else f"{name} {value}"
            for labels, value in rows if value is not None]
    return out


def render_metrics(runs: LiveRuns, latency: PlanLatency) -> str:
    """All metrics as Prometheus text (run names are safe label values: [A-Za-z0-9_.-])."""
    records: list[tuple[str, float | int | None]] = []
    lag: list[tuple[str, float | int | None]] = []
    rate: list[tuple[str, float | int | None]] = []
    applied: list[tuple[str, float | int | None]] = []
    kept: list[tuple[str, float | int | None]] = []
    seen: list[tuple[str, float | int | None]] = []
    size: list[tuple[str, float | int | None]] = []
    quant: list[tuple[str, float | int | None]] = []
    for r in runs.loaded():
        label = f'run="{r.run}"'
        try:
            info = runs.store.run_info(r.run)
            records.append((label, info.records))
            lag.append((label, info.lag_records))
            size.append((label, info.num_samples))
        except (redis.RedisError, ValueError):
            pass
        if not r.ready:
            continue
        s = r.refresh_stats()
        applied.append((label, r.mat().table.applied))
        rate.append((label, round(s.ingest_rate, 3)))
        kept.append((label, s.kept_fraction))
        seen.append((label, s.seen_samples))
        quant += [(f'{label},quantile="{q}"', v) for q, v in s.quantiles.items()]
    lines = [
        *_gauge("hardbatch_ingest_records_total", "Loss records appended to the run's log.",
                records, "counter"),
        *_gauge("hardbatch_applied_records_total", "Loss records applied to the service table.",
                applied, "counter"),
        *_gauge("hardbatch_ingest_rate_records_per_second",
                "Records applied per second over the last refresh.", rate),
        *_gauge("hardbatch_ingest_lag_records", "Records appended but not yet applied.", lag),
        *_gauge("hardbatch_num_samples", "Dataset size of the run.", size),
        *_gauge("hardbatch_seen_samples", "Samples scored at least once.", seen),
        *_gauge("hardbatch_kept_fraction", "Share of scored records the filter kept.", kept),
        *_gauge("hardbatch_hardness_quantile",
                "Quantiles of the moving-average loss over seen samples.", quant),
        *latency.render(),
        *_gauge("hardbatch_redis_up", "Whether the last Redis call of the service worked.",
                [("", int(runs.redis_ok))]),
        *_gauge("hardbatch_background_errors_total",
                "Errors the service's background threads hit (each is retried).",
                [(f'component="{c}",error="{k}"', n)
                 for (c, k), n in sorted(runs.errors.snapshot().items())], "counter"),
        *_gauge("hardbatch_table_reloads_total",
                "Times a run's table was rebuilt from its snapshot (log gap, or Redis lost "
                "entries in a restart).",
                [(f'run="{r.run}"', r.materializer.reloads) for r in runs.loaded()
                 if r.materializer is not None], "counter"),
        *_gauge("hardbatch_rounds_composed_early_total",
                "Rounds composed before all of the previous round's losses arrived (not "
                "reproducible per seed).",
                [(f'run="{r.run}"', r.rounds_composed_early) for r in runs.loaded()], "counter"),
        *_gauge("hardbatch_run_ready", "Whether a loaded run's table follows its log.",
                [(f'run="{r.run}"', int(r.state == "ready")) for r in runs.loaded()]),
    ]
    return "\n".join(lines) + "\n"
