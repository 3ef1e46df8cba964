"""The runtime cost model: does the loss filter pay for its scoring forward, right now?

A filtered step costs a scoring forward plus a training step on the kept share `s` of the
batch; a full step trains on the whole batch (design.md §7). Early in training the filter keeps
most of each batch and on flat losses it keeps most forever: then the scoring forward is pure
cost. The model predicts the filtered step's cost from what it measured, as a share of a full
step,

    rho = score_s / full_s + o + (1 - o) * s,

where `o` is the fixed share of a training step (what does not shrink with fewer samples),
fitted from filtered steps (`train_s / full_s = o + (1 - o) s`), and `s` is the latest kept
fraction. A full step's per-sample losses come out of its training forward for free, so the
worker can say what the filter *would* have kept; `s` then stays current in both modes and
filtering turns back on as soon as it pays, not at the next probe. Hysteresis: filtering turns
on when `rho < 1 - margin` and off when `rho > 1`; in between the mode stays. Every
`probe_every` steps the mode not in use runs for `probe_steps` steps, so the costs it was
judged by stay fresh.

Progress: a kept fraction that is still falling says the losses are concentrating on a few
samples, the phase in which filtered steps learn the most per step (measured on MNIST-1D: the
filter keeps 78% over the first epoch and 31% over the second; turned off there because a
filtered step then costs about a full one, the run took 35 s to plain's best instead of 16,
README). So `s` in
`rho` is the kept fraction projected `horizon_steps` ahead along its trend (measured over
`trend_window` steps) when it falls; on flat losses it does not fall (a sequence model: 83%
from the first epoch to the last) and the projection is the current value.

Distributed use: every rank must take the same branch, or the ranks' collectives diverge. The
model is a pure function of what it is told, so feed it numbers reduced over all ranks (e.g.
the slowest rank's seconds, or the mean, and the global kept fraction) and every rank decides
alike.

Example:
    >>> cm = CostModel(CostModelConfig(warmup_steps=2, probe_every=100))
    >>> for step in range(4):
    ...     mode = cm.decide(step)
    ...     if mode is Mode.FILTER:   # scoring 0.3 s + training 0.6 s at s = 0.9: no gain
    ...         cm.observe(step, mode, score_s=0.3, train_s=0.6, kept_frac=0.9)
    ...     else:
    ...         cm.observe(step, mode, score_s=0.0, train_s=0.62, kept_frac=0.9)
    >>> cm.decide(4).value
    'full'

Pure Python and numpy, no I/O.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: The fixed share `o` is fitted only from filtered steps keeping less than this: near s = 1 a
#: step's timing noise is multiplied by 1 / (1 - s) (MNIST-1D's first epoch, s ~ 0.76, read o ~
#: 0.75 where steps keeping 10% give ~0.2, and turned the filter off while it learned fastest).
FIT_BELOW = 0.5


class Mode(enum.Enum):
    """What the worker does this step."""

    FILTER = "filter"  # scoring forward, loss filter, train on the kept samples
    FULL = "full"  # train on the whole batch (losses still reported, from its forward)


@dataclass(frozen=True)
class CostModelConfig:
    """When filtering counts as paying.

    Attributes:
        margin: Filtering turns on when a filtered step is predicted to cost less than
            `1 - margin` of a full step, and off when it costs more than a full step.
        warmup_steps: Steps measured in each mode (full first) before the first decision.
        probe_every: Steps between probes of the mode not in use.
        probe_steps: Steps per probe.
        smoothing: Weight of the old estimate when a new measurement arrives (an EMA).
        trend_window: Steps over which the kept fraction's trend is measured.
        horizon_steps: How far ahead a falling kept fraction is projected; 0 judges by the
            current kept fraction only.
    """

    margin: float = 0.05
    warmup_steps: int = 10
    probe_every: int = 200
    probe_steps: int = 4
    smoothing: float = 0.8
    trend_window: int = 50
    horizon_steps: int = 200

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin) and 0.0 <= self.margin < 1.0):
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {self.warmup_steps}")
        if self.probe_steps < 1 or self.probe_every <= self.probe_steps:
            raise ValueError("need probe_steps >= 1 and probe_every > probe_steps, got "
                             f"{self.probe_steps} and {self.probe_every}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if self.trend_window < 1:
            raise ValueError(f"trend_window must be >= 1, got {self.trend_window}")
        if self.horizon_steps < 0:
            raise ValueError(f"horizon_steps must be >= 0, got {self.horizon_steps}")


@dataclass
class _Estimates:
    full_s: float | None = None  # seconds of a full step
    score_s: float | None = None  # seconds of the scoring forward
    overhead: float | None = None  # o: fixed share of a training step
    kept_frac: float | None = None  # s: latest kept fraction (measured or would-be)
    kept_slope: float = 0.0  # change of s per step over the last trend window
    anchor_frac: float | None = None  # s at the start of the current trend window
    anchor_step: int = 0
    filter_steps: int = 0
    full_steps: int = 0


@dataclass
class CostModel:
    """Chooses, per step, between filtered and full steps from measured costs.

    Call `decide(step)` before the step and `observe(...)` after it, on every rank with the
    same (reduced) numbers. `decisions` records every change of mode (and why) for metrics;
    `state_dict`/`load_state_dict` carry it across a checkpoint.
    """

    config: CostModelConfig = field(default_factory=CostModelConfig)
    mode: Mode = Mode.FILTER
    decisions: list[dict[str, Any]] = field(default_factory=list)
    _est: _Estimates = field(default_factory=_Estimates)
    _last_switch: int = 0

    # -- the two calls ---------------------------------------------------------------------

    def decide(self, step: int) -> Mode:
        """The mode of `step` (steps count up from 0; the same step always gets one answer)."""
        cfg, est = self.config, self._est
        # Full steps first: a filtered step is judged against them (the fixed share `o` needs
        # the cost of a full step), and early in training the filter seldom pays anyway.
        if est.full_steps < cfg.warmup_steps:
            return Mode.FULL
        if est.filter_steps < cfg.warmup_steps:
            return Mode.FILTER
        rho = self.predicted_ratio()
        assert rho is not None  # both modes measured
        if self.mode is Mode.FILTER and rho > 1.0:
            self._switch(step, Mode.FULL, rho)
        elif self.mode is Mode.FULL and rho < 1.0 - cfg.margin:
            self._switch(step, Mode.FILTER, rho)
        since = step - self._last_switch
        if since > 0 and since % cfg.probe_every >= cfg.probe_every - cfg.probe_steps:
            return Mode.FULL if self.mode is Mode.FILTER else Mode.FILTER
        return self.mode

    def observe(self, step: int, mode: Mode, *, score_s: float, train_s: float,
                kept_frac: float | None) -> None:
        """Records what one step cost.

        Args:
            step: The step (for the record only).
            mode: The mode it ran in.
            score_s: Seconds of its scoring forward (0 for a full step).
            train_s: Seconds of its training step (forward, backward, optimizer).
            kept_frac: Share of the batch the filter kept; for a full step, the share it would
                have kept (from the training forward's losses), or None if not computed.

        Raises:
            ValueError: Negative or non-finite seconds, or a kept fraction outside [0, 1].
        """
        for name, v in (("score_s", score_s), ("train_s", train_s)):
            if not (math.isfinite(v) and v >= 0.0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if kept_frac is not None and not 0.0 <= kept_frac <= 1.0:
            raise ValueError(f"kept_frac must be in [0, 1], got {kept_frac!r}")
        est, a = self._est, self.config.smoothing
        if kept_frac is not None:
            est.kept_frac = _ema(est.kept_frac, kept_frac, a)
            self._track_trend(step)
        if mode is Mode.FULL:
            est.full_s = _ema(est.full_s, train_s + score_s, a)
            est.full_steps += 1
            return
        est.score_s = _ema(est.score_s, score_s, a)
        est.filter_steps += 1
        if est.full_s and kept_frac is not None and kept_frac < FIT_BELOW:
            # o from train_s / full_s = o + (1 - o) s: the timing noise is divided by 1 - s.
            o = (train_s / est.full_s - kept_frac) / (1.0 - kept_frac)
            est.overhead = _ema(est.overhead, min(max(o, 0.0), 1.0), a)

    # -- what it knows ---------------------------------------------------------------------

    def predicted_ratio(self) -> float | None:
        """Predicted cost of a filtered step over a full one (None until both were measured)."""
        est = self._est
        if not est.full_s or est.score_s is None or est.kept_frac is None:
            return None
        # Until a filtered step with a useful kept fraction was seen, assume no fixed share:
        # the most optimistic reading, so filtering is tried rather than ruled out.
        o = est.overhead if est.overhead is not None else 0.0
        return est.score_s / est.full_s + o + (1.0 - o) * self._projected(est.kept_frac)

    def projected_kept(self) -> float | None:
        """The kept fraction `rho` is judged by: the current one, or where its falling trend
        leads in `horizon_steps` steps (never below 0); None before any was observed."""
        kept = self._est.kept_frac
        return None if kept is None else self._projected(kept)

    def _projected(self, kept: float) -> float:
        return max(kept + min(self._est.kept_slope, 0.0) * self.config.horizon_steps, 0.0)

    def _track_trend(self, step: int) -> None:
        est = self._est
        if est.anchor_frac is None or step < est.anchor_step:
            est.anchor_frac, est.anchor_step = est.kept_frac, step
        elif step - est.anchor_step >= self.config.trend_window:
            assert est.kept_frac is not None
            est.kept_slope = (est.kept_frac - est.anchor_frac) / (step - est.anchor_step)
            est.anchor_frac, est.anchor_step = est.kept_frac, step

    def summary(self) -> dict[str, Any]:
        """Numbers for metrics: mode, estimates, predicted ratio and the number of switches."""
        return {"mode": self.mode.value, "predicted_ratio": self.predicted_ratio(),
                "switches": len(self.decisions), **asdict(self._est)}

    def _switch(self, step: int, to: Mode, rho: float) -> None:
        self.decisions.append({"step": step, "mode": to.value, "predicted_ratio": rho,
                               "kept_frac": self._est.kept_frac,
                               "projected_kept": self.projected_kept()})
        self.mode = to
        self._last_switch = step

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "decisions": [dict(d) for d in self.decisions],
                "estimates": asdict(self._est), "last_switch": self._last_switch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mode = Mode(state["mode"])
        self.decisions = [dict(d) for d in state["decisions"]]
        self._est = _Estimates(**state["estimates"])
        self._last_switch = int(state["last_switch"])


@dataclass(frozen=True)
class KeptGate:
    """Whether the loss filter runs in the next stretch of steps, from the kept shares alone.

    The default cost model of the filter: a deterministic rule where `CostModel` times steps.
    A filtered step costs a scoring forward, about a third of a training step (a forward,
    where a step runs a forward and a backward), plus a training step on the kept share `s` of
    the batch; so it pays only for `s < 1 - 1/3`, or where `s` is falling fast enough to get
    there within a round: losses concentrating on a few samples, the phase in which filtered
    steps learn the most per step (MNIST-1D keeps 90% of its first batches and 36% at the end
    of its first epoch). Where `s` stays high (a sequence model keeps 90% of its first batches
    and 83% from the middle of its first epoch to its last) the filter stays off, and every
    step trains the whole batch, whose training forward gives the losses to report and the
    share the filter *would* keep: it turns on as soon as that share says it pays.

    A round is cut into `windows` stretches of steps; after each, `filters` decides the next
    from the shares of the stretches so far (up to a round back), the last one projected a
    round ahead along its fall over them. The fall is measured over up to a round, not from
    stretch to stretch: a share that only wobbles (87% +- 2 points on the tabular task with
    flipped labels) must not read as a fall of 8 x 2 points. Training starts with full steps
    (nothing is known yet).

    Attributes:
        max_kept: Kept share from which filtering does not pay.
        windows: Stretches per round (decisions per round).

    Example:
        >>> gate = KeptGate()
        >>> gate.filters([0.90, 0.87])   # high, but falling 3 points a stretch
        True
        >>> gate.filters([0.898, 0.894, 0.876, 0.845])  # falling 1.8 points a stretch
        False
    """

    max_kept: float = 2.0 / 3.0
    windows: int = 8

    def __post_init__(self) -> None:
        if not 0.0 < self.max_kept <= 1.0:
            raise ValueError(f"max_kept must be in (0, 1], got {self.max_kept}")
        if self.windows < 1:
            raise ValueError(f"windows must be >= 1, got {self.windows}")

    def projected(self, shares: Sequence[float]) -> float:
        """The kept share one round ahead: the last of `shares` (oldest first), or lower along
        its mean fall per stretch over the last `windows` of them."""
        recent = list(shares)[-(self.windows + 1):]
        last = recent[-1]
        if len(recent) < 2 or last >= recent[0]:
            return last
        fall = (recent[0] - last) / (len(recent) - 1)
        return max(last - fall * self.windows, 0.0)

    def filters(self, shares: Sequence[float]) -> bool:
        """Whether the next stretch filters, given the kept (or would-be kept) share of each
        stretch so far, oldest first (the last `windows + 1` are used)."""
        if not shares:
            return False
        return self.projected(shares) < self.max_kept


def _ema(old: float | None, new: float, keep: float) -> float:
    return new if old is None else keep * old + (1.0 - keep) * new


@dataclass
class StepCurve:
    """A training step's cost as a line in its sample count, `time(n) = a + b n`, fitted from
    measured steps (issue 25: measure the curve, don't assume it).

    `a` is what a step costs whatever it trains (the optimizer update, loading the batch,
    kernel launches, a GPU's small-model floor), `b` each sample's share. Shrinking a batch to
    its kept share `s` saves `b (1 - s) B` of a step's `a + b B`, and scoring costs `score_s`:
    the in-batch filter pays only where `score_s < b (1 - s) B`.

    The fit is robust (Theil-Sen: the median of the slopes between pairs of steps, the median
    intercept), so a few slow steps (a garbage collection, a first-call allocation, another
    process taking the core) do not tilt it, and the scoring time is a median. Each rank fits
    its own steps; `estimate()` gives numbers that ranks add up (one all-reduce) and `verdict`
    averages them.

    Example:
        >>> c = StepCurve()
        >>> for n in (64, 128, 256, 256, 200):
        ...     c.add(n, 0.002 + 1e-5 * n, score_s=0.001)
        >>> c.add(128, 0.5)  # an outlier: a step that waited on something else
        >>> a, b = c.fit()
        >>> round(a, 6), round(b, 8), c.score_s
        (0.002, 1e-05, 0.001)
    """

    samples: list[tuple[float, float, float]] = field(default_factory=list)  # n, train s, score s

    def add(self, n: float, train_s: float, score_s: float = 0.0) -> None:
        self.samples.append((float(n), float(train_s), float(score_s)))

    @property
    def steps(self) -> int:
        return len(self.samples)

    @property
    def score_s(self) -> float:
        """Median scoring time of the steps that scored (0 if none did)."""
        scores = sorted(s for _, _, s in self.samples if s > 0)
        return scores[len(scores) // 2] if scores else 0.0

    def fit(self) -> tuple[float, float] | None:
        """(a, b), or None before two distinct sample counts were measured (all steps full:
        the slope cannot be told from the intercept)."""
        if len(self.samples) < 2:
            return None
        n, t, _ = np.asarray(self.samples, dtype=np.float64).T
        dn = n[None, :] - n[:, None]
        pairs = np.triu(np.abs(dn) > 1e-9 * max(float(np.abs(n).max()), 1.0), k=1)
        if not pairs.any():
            return None
        b = float(np.median(((t[None, :] - t[:, None])[pairs]) / dn[pairs]))
        return float(np.median(t - b * n)), b

    def estimate(self) -> list[float]:
        """`[a, b, score_s, 1]` to add up over ranks, or zeros where nothing is known."""
        ab = self.fit()
        return [0.0] * 4 if ab is None else [*ab, self.score_s, 1.0]

    @staticmethod
    def verdict(estimates: Sequence[float], batch_size: int) -> dict[str, float | None]:
        """From `estimate()`s added up over ranks: the mean a, b and scoring seconds, and
        `shrink_pays_below`, the kept share under which a filtered step is cheaper than a full
        one by the curve (0: never; None: not known)."""
        a_sum, b_sum, score_sum, known = estimates
        if known <= 0:
            return {"a": None, "b": None, "score_s": None, "shrink_pays_below": None}
        a, b, score = a_sum / known, b_sum / known, score_sum / known
        pays = max(0.0, 1.0 - score / (b * batch_size)) if b > 0 else 0.0
        return {"a": a, "b": b, "score_s": score, "shrink_pays_below": pays}
