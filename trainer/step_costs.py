"""The `Worker`'s side of the runtime cost model: it times the user's steps without touching
their loop, reduces the times over ranks and asks `CostModel` the mode of each step.

A step's seconds run from one `Worker.select` call's entry to the next (the user's training
forward, backward and optimizer step lie in between); its scoring seconds are those `select`
spent in the scoring forward. Whatever else lies between two selects must not count as a
step: the gap is dropped across an epoch change (loader start-up, end-of-epoch evaluation),
after `summary()`, a public `all_reduce` (the built-in loop's evaluation) or a resume, and a
step more than `OUTLIER` times the median of its mode's last steps is dropped as well (a user's
own evaluation or checkpoint between steps).

One collective per step: the previous step's measurement rides on `select`'s all-reduce of
the kept count (`pending()` appends it, `settle()` reads the sums back). Every rank then
observes the same reduced numbers and decides alike; the mode of step t + 1 is decided in step
t's `select` from the measurements up to step t - 1 (step t is still running).

Example:
    >>> costs = StepCosts()
    >>> costs.begin(epoch=0).value     # warm-up: full steps first
    'full'
    >>> costs.settle(0, costs.pending(), world_size=1)  # the select's all-reduce gave these
    >>> costs.begin(epoch=0).value
    'full'
"""

from __future__ import annotations

import time
from collections import deque
from statistics import median
from typing import Any

from hardbatch.sampler.cost_model import CostModel, CostModelConfig, Mode

OUTLIER = 4.0  # a step this many times its mode's recent median is not a step's cost
RECENT = 16  # steps per mode the median is over (dropped ones included, so a lasting change
#             of pace is accepted after RECENT / 2 steps)


class StepCosts:
    """Times steps between `select` calls and decides each step's mode (see module doc)."""

    def __init__(self, config: CostModelConfig | None = None) -> None:
        self.model = CostModel(config or CostModelConfig())
        self.mode = self.model.decide(0)  # of the step in flight
        self._next = self.mode
        self._entry: float | None = None  # perf_counter at the last select's entry
        self._epoch: int | None = None
        self._score_s = 0.0
        self._kept_frac: float | None = None
        self._measured = [0.0] * 5
        self._measured_mode = self.mode  # of the step `_measured` measured
        self._recent: dict[Mode, deque[float]] = {m: deque(maxlen=RECENT) for m in Mode}

    # -- per step, in this order ------------------------------------------------------------

    def begin(self, epoch: int) -> Mode:
        """At `select`'s entry: closes the previous step's measurement; this step's mode."""
        now = time.perf_counter()
        if self._entry is not None and epoch == self._epoch:
            kept = self._kept_frac
            self._measured = [now - self._entry, self._score_s,
                              0.0 if kept is None else kept, float(kept is not None), 1.0]
        else:
            self._measured = [0.0] * 5
        self._measured_mode = self.mode
        self._entry, self._epoch = now, epoch
        self.mode, self._score_s, self._kept_frac = self._next, 0.0, None
        return self.mode

    def scored(self, seconds: float) -> None:
        """This step's scoring forward took `seconds`."""
        self._score_s += seconds

    def kept(self, fraction: float | None) -> None:
        """The share of this step's batch the filter kept (would have kept on a full step)."""
        self._kept_frac = fraction

    def pending(self) -> list[float]:
        """The previous step's measurement, to append to this step's all-reduce: its step and
        scoring seconds, kept fraction, whether that was known, and whether it was measured."""
        return list(self._measured)

    def settle(self, step: int, sums: list[float], world_size: int) -> None:
        """After the all-reduce of step `step`: observes step `step - 1` from `sums` (the
        pending lists summed over ranks) and decides the mode of step `step + 1`."""
        step_s, score_s, kept_sum, kept_known, measured = sums
        if measured >= world_size and self._accept(self._measured_mode, step_s / measured):
            self.model.observe(step - 1, self._measured_mode, score_s=score_s / measured,
                               train_s=max(step_s - score_s, 0.0) / measured,
                               kept_frac=min(kept_sum / kept_known, 1.0) if kept_known else None)
        self._next = self.model.decide(step + 1)

    def interrupt(self) -> None:
        """Something other than training runs before the next `select`: no step is measured
        across it."""
        self._entry = None

    def _accept(self, mode: Mode, step_s: float) -> bool:
        recent = self._recent[mode]
        usual = median(recent) if len(recent) >= 4 else None
        recent.append(step_s)
        return usual is None or step_s <= OUTLIER * usual

    # -- metrics and checkpoints ------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "mode": self.mode.value,
                "next": self._next.value,
                "recent": {m.value: list(r) for m, r in self._recent.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.mode, self._next = Mode(state["mode"]), Mode(state["next"])
        for m, r in self._recent.items():
            r.clear()
            r.extend(state["recent"][m.value])
        self.interrupt()
