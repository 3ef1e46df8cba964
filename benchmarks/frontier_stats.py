"""The frontier's arithmetic: targets, time to a target over seeds, and the best config per arm.

Pure functions over run curves (lists of eval dicts with `train_time_s`, `val_accuracy`,
`val_loss`), so they are tested without training anything.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

# Targets run from the plain frontier's best median down by one accuracy point in 0.1-point
# steps; for tasks judged by validation loss, from the best median loss up by 2% in 0.2% steps.
STEPS = 10
ACCURACY_WINDOW = 0.01
LOSS_WINDOW = 0.02

Curve = Sequence[dict[str, float]]


def key_of(metric: str) -> str:
    return "val_accuracy" if metric == "accuracy" else "val_loss"


def reaches(value: float, target: float, metric: str) -> bool:
    # A hair of slack, so a target computed from the same numbers is reached by them exactly.
    return value >= target - 1e-12 if metric == "accuracy" else value <= target + 1e-12


def final(curve: Curve, metric: str) -> float:
    return curve[-1][key_of(metric)]


def time_to(curve: Curve, target: float, metric: str) -> float | None:
    """Training seconds at which the curve first reached `target`, or None if it never did:
    interpolated linearly between the last eval short of it and the first at or past it (from
    the start of training for the first eval), so a crossing is not rounded up to the next
    evaluation, however sparse.

    Example:
        >>> c = [{"train_time_s": 10.0, "val_accuracy": 0.5}, {"train_time_s": 20.0,
        ...      "val_accuracy": 0.9}]
        >>> time_to(c, 0.8, "accuracy"), time_to(c, 0.5, "accuracy"), time_to(c, 0.95, "accuracy")
        (17.5, 10.0, None)
    """
    key = key_of(metric)
    for i, e in enumerate(curve):
        if not reaches(e[key], target, metric):
            continue
        if i == 0:
            return e["train_time_s"]
        before = curve[i - 1]
        span = e[key] - before[key]
        frac = (target - before[key]) / span if span else 1.0
        t0 = before["train_time_s"]
        return t0 + min(max(frac, 0.0), 1.0) * (e["train_time_s"] - t0)
    return None


def half_time(times: Sequence[float | None]) -> float | None:
    """The time by which half of the seeds reached a target: the median for an odd count (the
    lower median for an even one), with "never" (None) counted as later than any time. None
    when more than half never did.

    Example:
        >>> half_time([3.0, None, 1.0]), half_time([1.0, None, None]), half_time([2.0, 1.0])
        (3.0, None, 1.0)
    """
    ranked = sorted(times, key=lambda t: math.inf if t is None else t)
    return ranked[math.ceil(len(ranked) / 2) - 1] if ranked else None


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def targets_from(best: float, metric: str) -> list[float]:
    """From `best` (the plain frontier's best median) to one point (2%) worse, in 11 steps."""
    if metric == "accuracy":
        return [best - ACCURACY_WINDOW * k / STEPS for k in range(STEPS + 1)]
    return [best * (1 + LOSS_WINDOW * k / STEPS) for k in range(STEPS + 1)]


def best_config(curves_by_config: dict[str, list[Curve]], metric: str) -> str:
    """The config with the best median final value of `metric`."""
    def score(name: str) -> float:
        m = statistics.median(final(c, metric) for c in curves_by_config[name])
        return m if metric == "accuracy" else -m

    return max(curves_by_config, key=score)


def fastest(curves_by_config: dict[str, list[Curve]], target: float,
            metric: str) -> tuple[float | None, str | None, list[float | None]]:
    """(best half-time over configs, that config, its per-seed times) for one target."""
    best: tuple[float | None, str | None, list[float | None]] = (None, None, [])
    for name, curves in curves_by_config.items():
        times = [time_to(c, target, metric) for c in curves]
        t = half_time(times)
        if t is not None and (best[0] is None or t < best[0]):
            best = (t, name, times)
    return best


def ratio(slow: float | None, fast: float | None) -> float | None:
    """slow / fast, or None when either never reached the target."""
    return slow / fast if slow is not None and fast is not None and fast > 0 else None


def min_speedup(speedups: Sequence[float | None]) -> float | None:
    """The smallest speedup over targets; a target hardbatch never reached counts as 0."""
    return min((0.0 if s is None else s) for s in speedups) if speedups else None


def seed_resamples(n: int, limit: int = 3125, seed: int = 0) -> list[tuple[int, ...]]:
    """Resamples of `n` seeds with replacement, as index tuples: all `n ** n` of them (the
    exact bootstrap) up to `limit`, else `limit` drawn with a fixed seed.

    Example:
        >>> len(seed_resamples(3)), seed_resamples(2)
        (27, [(0, 0), (0, 1), (1, 0), (1, 1)])
    """
    if n ** n <= limit:
        return list(itertools.product(range(n), repeat=n))
    rng = random.Random(seed)
    return [tuple(rng.randrange(n) for _ in range(n)) for _ in range(limit)]


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """The 10th and 90th percentile of `values`, each one of them (nearest rank: an infinite
    value, an arm whose control never got there, stays infinite).

    Example:
        >>> percentiles([1.0, 2.0, 3.0, 0.0, math.inf])
        {'p10': 0.0, 'p90': inf}
    """
    lo, hi = np.percentile(np.array(values, dtype=float), [10, 90], method="inverted_cdf")
    return {"p10": float(lo), "p90": float(hi)}


def versus(rows: Sequence[dict[str, Any]], arm: str, control: str) -> dict[str, Any]:
    """`arm` against `control` (its same-size uniform plans) over the targets: the speedup at
    each (None where either never reached it), their median where both did, and how many
    targets only one of them reached.

    Example:
        >>> rows = [{"a_time_s": None, "b_time_s": None}, {"a_time_s": 8.0, "b_time_s": None},
        ...         {"a_time_s": 4.0, "b_time_s": 6.0}, {"a_time_s": 3.0, "b_time_s": 3.0}]
        >>> v = versus(rows, "a", "b")
        >>> v["median"], v["only_arm"], v["only_control"]
        (1.25, 1, 0)
    """
    pairs = [(r[f"{arm}_time_s"], r[f"{control}_time_s"]) for r in rows]
    speedups = [ratio(c, a) for a, c in pairs]
    both = [x for x in speedups if x is not None]
    return {"arm": arm, "control": control, "speedups": speedups,
            "median": statistics.median(both) if both else None,
            "only_arm": sum(a is not None and c is None for a, c in pairs),
            "only_control": sum(a is None and c is not None for a, c in pairs)}


def summarize_config(curves: list[Curve], kept: list[float], targets: list[float],
                     metric: str) -> dict[str, Any]:
    """Medians and spreads of one config over its seeds."""
    return {
        "final_accuracy": spread([c[-1]["val_accuracy"] for c in curves]),
        "final_val_loss": spread([c[-1]["val_loss"] for c in curves]),
        "train_time_s": spread([c[-1]["train_time_s"] for c in curves]),
        "final_kept_fraction": spread(kept),
        "time_to_target_s": [
            {"target": t, "half_time": half_time(ts := [time_to(c, t, metric) for c in curves]),
             "per_seed": ts}
            for t in targets
        ],
    }
