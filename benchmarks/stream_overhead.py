"""`hardbatch bench stream-overhead`: training time with loss streaming on vs off.

The built-in task trains with the batch loss filter, once without a reporter and once with a
`LossReporter` streaming every scored example to an embedded Redis, in pairs side by side
(alternating which goes first, so drift and warm-up hit both alike). The figure is the median
over pairs of streaming / plain training time (`RunResult.train_time_s`, which excludes
validation). Each streaming run must deliver every record (`close()` reports it), and the time
`close()` waits for the tail of the stream is reported separately: it comes after training.
Two load-insensitive companions are reported too: the ratio of process CPU time (all threads,
so the reporter's own thread is counted) and the share of training time spent inside
`report()` calls, which is all the training loop itself ever waits for.

No consumer runs here: applying the log is the service's cost (see `bench ingest`).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Any

from hardbatch.services.redis_server import EmbeddedRedis
from hardbatch.trainer.reporter import LossReporter
from hardbatch.trainer.train import TrainConfig, fit

# Many short pairs rather than a few long ones: on a shared machine other load comes in
# bursts of seconds, and the median over many pairs shrugs off the pairs a burst hit.
FULL = dict(num_samples=50_000, epochs=1, batch_size=256, width=64, pairs=15)
QUICK = dict(num_samples=3_000, epochs=1, batch_size=128, width=16, pairs=3)
BAR = 1.03


class _TimedReporter:
    """Passes reports on and adds up the time the training loop spent inside report()."""

    def __init__(self, inner: LossReporter) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0

    def report(self, ids: Any, losses: Any, kept: Any, step: int, epoch: int) -> None:
        t = time.perf_counter()
        self.inner.report(ids, losses, kept, step, epoch)
        self.seconds += time.perf_counter() - t
        self.calls += 1


def run(quick: bool, out: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(QUICK if quick else FULL)
    pairs = cfg.pop("pairs")
    # One torch thread: the other core is left for the reporter's thread and Redis, as a
    # worker would leave the rest of its host to them; it also keeps the timings steadier.
    config = TrainConfig(**cfg, progress=False, threads=1, evals_per_epoch=1)
    plain_s: list[float] = []
    stream_s: list[float] = []
    cpu_ratios: list[float] = []
    close_s: list[float] = []
    report_s: list[float] = []
    ratios: list[float] = []
    load_before = os.getloadavg()[0]
    with EmbeddedRedis() as server:
        fit(dataclasses.replace(config, epochs=1))  # warm-up: data cache, allocator, kernels
        for i in range(pairs):
            times: dict[bool, float] = {}
            cpu: dict[bool, float] = {}
            for streaming in ((False, True) if i % 2 == 0 else (True, False)):
                if not streaming:
                    c = time.process_time()
                    times[False] = fit(config).train_time_s
                    cpu[False] = time.process_time() - c
                    continue
                rep = _TimedReporter(LossReporter(server.url, f"overhead-{i}", rank=0,
                                                  num_samples=config.num_samples))
                c = time.process_time()
                times[True] = fit(config, reporter=rep).train_time_s
                cpu[True] = time.process_time() - c
                report_s.append(rep.seconds)
                t = time.perf_counter()
                report = rep.inner.close(120)
                close_s.append(time.perf_counter() - t)
                expected = config.num_samples * config.epochs
                if not report.ok or report.delivered_records != expected:
                    raise RuntimeError(f"streaming run lost records: {report}")
            plain_s.append(times[False])
            stream_s.append(times[True])
            ratios.append(times[True] / times[False])
            cpu_ratios.append(cpu[True] / cpu[False])
            print(f"  pair {i + 1}/{pairs}: plain {times[False]:.3f} s, "
                  f"streaming {times[True]:.3f} s, ratio {ratios[-1]:.4f} "
                  f"(process CPU time ratio {cpu_ratios[-1]:.4f})")
    result: dict[str, Any] = {
        "overhead_ratio": statistics.median(ratios),
        "bar_overhead_ratio": BAR,
        "passes": statistics.median(ratios) <= BAR,
        "ratio_of_medians": statistics.median(stream_s) / statistics.median(plain_s),
        "pair_ratios": ratios,
        "plain_train_s": plain_s,
        "streaming_train_s": stream_s,
        "close_wait_s": close_s,
        "cpu_time_ratio": statistics.median(cpu_ratios),
        "pair_cpu_time_ratios": cpu_ratios,
        "report_call_s_per_run": report_s,
        "report_call_share": statistics.median(r / t for r, t in zip(report_s, stream_s,
                                                                     strict=True)),
        "load_average_1m_before": load_before,
        "load_average_1m_after": os.getloadavg()[0],
        "records_per_run": config.num_samples * config.epochs,
        "config": dataclasses.asdict(config),
        "quick": quick,
    }
    print(f"stream-overhead: {pairs} pairs, {config.num_samples} samples x {config.epochs} "
          f"epochs, batch {config.batch_size}")
    print(f"  median plain     {statistics.median(plain_s):8.3f} s")
    print(f"  median streaming {statistics.median(stream_s):8.3f} s")
    print(f"  overhead ratio   {result['overhead_ratio']:8.4f}   (bar <= {BAR})")
    print(f"  CPU time ratio   {result['cpu_time_ratio']:8.4f}   (whole process, all threads)")
    print(f"  inside report()  {100 * result['report_call_share']:8.3f} % of streaming time")
    print(f"  close() wait     {max(close_s):8.3f} s at most")
    print(f"  load average     {load_before:.2f} before, {result['load_average_1m_after']:.2f} "
          "after (2 cores; others' load shows up as noise)")
    return result
