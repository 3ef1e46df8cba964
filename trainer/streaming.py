"""Streaming a single-machine training run's losses to the store, and the hardest samples after.

    with loss_stream("demo", num_samples=n, redis_url=None) as stream:   # None: embedded Redis
        result = fit(config, reporter=stream.reporter)
        summary = stream.finish()        # delivery report + table materialized from the log
    print(format_hardest(summary))

With no URL (and no $HARDBATCH_REDIS_URL) an embedded Redis lives for the `with` block, so
the demo works with no server started by hand; with a URL the run stays in that store for the
sampler service, `hardbatch runs` and `hardbatch export`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from hardbatch.services.materializer import Materializer
from hardbatch.services.redis_server import redis_url_or_embedded
from hardbatch.services.store import LossStore, RunInfo
from hardbatch.trainer.reporter import DeliveryReport, LossReporter


@dataclass(frozen=True)
class StreamSummary:
    """What a streamed run left in the store.

    Attributes:
        run: run name.
        url: the Redis it went to.
        delivery: the reporter's delivery report.
        info: the run's store counters after the table caught up.
        hardest: the hardest samples by moving-average loss, hardest first: dicts with
            sample_id, ema, last_loss, seen, kept.
    """

    run: str
    url: str
    delivery: DeliveryReport
    info: RunInfo
    hardest: list[dict[str, Any]]


class LossStream:
    """A reporter for one run, and `finish()` to close it and read the table back."""

    def __init__(self, url: str, run: str, num_samples: int, rank: int = 0,
                 **reporter_kwargs: Any) -> None:
        self.url = url
        self.run = run
        self.reporter = LossReporter(url, run, rank, num_samples=num_samples, **reporter_kwargs)
        self._summary: StreamSummary | None = None

    def finish(self, k: int = 10, timeout_s: float = 60.0) -> StreamSummary:
        """Closes the reporter, applies the whole log to a table and snapshots it."""
        if self._summary is not None:
            return self._summary
        delivery = self.reporter.close(timeout_s)
        store = LossStore.from_url(self.url)
        m = Materializer(store, self.run)
        m.catch_up(timeout_s)
        m.snapshot()
        with m.view() as t:
            hardest = [
                {"sample_id": int(i), "ema": float(t.ema[i]), "last_loss": float(t.last_loss[i]),
                 "seen": int(t.seen[i]), "kept": int(t.kept[i])}
                for i in t.hardest(k)
            ]
        self._summary = StreamSummary(self.run, self.url, delivery, store.run_info(self.run),
                                      hardest)
        store.client.close()
        return self._summary


@contextlib.contextmanager
def loss_stream(run: str, num_samples: int, redis_url: str | None = None, rank: int = 0,
                **reporter_kwargs: Any) -> Iterator[LossStream]:
    """A `LossStream` on `redis_url`, $HARDBATCH_REDIS_URL, or an embedded Redis."""
    with redis_url_or_embedded(redis_url) as url:
        stream = LossStream(url, run, num_samples, rank, **reporter_kwargs)
        try:
            yield stream
        finally:
            if stream._summary is None:
                stream.reporter.close(10.0)


def delivery_line(summary: StreamSummary) -> str:
    """What the reporter delivered to the store, in one line."""
    d = summary.delivery
    return (f"loss store: run {summary.run}: {d.delivered_records:,} of "
            f"{d.reported_records:,} records delivered, {summary.info.rejected} rejected"
            + ("" if d.ok else f", {d.pending_records:,} NOT delivered (left in {d.spill_path})"))


def fixed(value: float, width: int, digits: int = 4) -> str:
    """`value` right-aligned with `digits` decimals, never as "-0.0000": cross entropy gives
    -0.0 for a sample predicted with certainty (it negates a log-probability of 0)."""
    return f"{round(value, digits) + 0.0:>{width}.{digits}f}"


def hardest_table(rows: list[dict[str, Any]]) -> str:
    """Rows with id, ema, last_loss, seen and kept (the service's top-k records) as a table."""
    lines = [f"{'id':>8}{'ema':>10}{'last loss':>11}{'seen':>6}{'kept':>6}"]
    lines += [f"{h['id']:>8}{fixed(h['ema'], 10)}{fixed(h['last_loss'], 11)}{h['seen']:>6}"
              f"{h['kept']:>6}" for h in rows]
    return "\n".join(lines)


def format_hardest(summary: StreamSummary) -> str:
    """A small table of the hardest samples and the delivery counts."""
    rows = [{**h, "id": h["sample_id"]} for h in summary.hardest]
    return delivery_line(summary) + "\n" + hardest_table(rows)
