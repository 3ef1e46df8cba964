"""Plan composition: which sample ids every rank trains on next (design.md §5).

A *round* is one call of `compose_round`: it picks `M = world_size * batches * batch_size`
distinct ids for all ranks at once and splits them disjointly, so every rank gets the same number
of batches and no id goes to two ranks. A rank's plan is its slice of the round.

The round is a *stratified sample with known inclusion probabilities*, so its importance weights
make the gradient unbiased exactly, not approximately (InfoBatch's rescaled pruning, generalized
from two strata to several). For a hardness snapshot `h` (the current hardness of each sample):

- priority `p_i = ((h_i + eps) / (max h + eps)) ** alpha` (scaled to (0, 1] so the float32 power
  cannot overflow), and target `q_i = (1 - lam) p_i / sum(p) + lam / n`, a uniform floor so
  nothing starves (`n`: scored samples that are not suspect);
- samples never scored come first: a round takes every unseen sample before any seen one (a
  uniform subset of them when there are more than the round needs; such a round has weights 1);
- the scored samples are put in `strata` bins by priority (equal widths of log p, so the build is
  O(N), no sort). The remaining `R` slots get the inclusion probabilities `pi_i = min(1, c q_i)`
  with `c` solved so that they sum to R, averaged per stratum: stratum s takes `m_s` ids
  (largest remainder, summing to R exactly) uniformly without replacement, so every member's
  inclusion probability is exactly `pi_s = m_s / n_s`. Well-learned samples (low h) are pruned
  down to their floor, samples still being learned are over-sampled up to every one of them;
- importance weight `w_i = ((M / N) / pi_i) ** beta`. With beta = 1 the expected weighted sum
  over a round, `E[sum_{i in round} w_i g_i] = (M / N) sum_i g_i`, is the full-data sum scaled to
  the round, and the weights of a round add up to M exactly: divide by the kept count (or by the
  kept weight) and the loss scale matches uniform training. beta < 1 keeps part of the bias;
- suspects (the noise guard, `hardness.SuspectRule`) are taken only at the uniform floor's rate
  and always get weight 0: the worker scores them (which keeps their record current, so a sample
  the model comes to get right is cleared) but never trains on them;
- adaptive size (`size_factor > 0`): a round trains on `size_factor` times the share of the
  scored samples that carry `size_mass` of their last losses (what the loss filter would keep of a
  batch, so ~4x leaves it room), at most all of them: the whole round while losses are spread
  (early epochs, flat tasks), few once most samples are learned. Packed (`packed`, the
  default), the round is that many *full* batches: a round that trains 40% of the data takes
  40% of the steps (InfoBatch's way: the saving holds wherever a step costs about the same at
  any batch size, a GPU's small models, a small MLP), every rank gets the same number of
  batches and only each rank's last batch may be short (its tail slots `SKIP`). Unpacked, the
  round keeps its shape (an epoch's steps) and its other slots hold ids marked `SKIP` (weight
  -1) that the worker neither loads nor scores, spread so every batch trains on the same count
  +- 1;
- annealing: rounds in the last `anneal_frac` of `total_rounds` are uniform over all ids
  (weights 1, suspects still 0), as InfoBatch ends on the full data;
- deterministic: the random stream is seeded from (seed, round, world size) only, so the same
  snapshot gives the same round after a restart.

A round costs O(M) after an O(N) build per snapshot (O(N) with an adaptive size). Everything
here is pure numpy: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hardbatch.sampler.hardness import SuspectRule

#: Hardness fields a plan can be biased by.
HARDNESS_FIELDS = ("ema", "last_loss")
#: How hardness becomes priority (see `PlanConfig.priority`).
PRIORITIES = ("loss", "uncertain")
#: Weight of a slot the round does not train (adaptive size): not loaded, not scored.
SKIP = -1.0


@dataclass(frozen=True)
class PlanConfig:
    """How plans lean toward samples still being learned.

    Attributes:
        alpha: Priority exponent; 0 gives uniform plans, larger values favour hard samples more.
        lam: Uniform floor in [0, 1]: the share of the target distribution spread evenly over all
            samples, so no sample's chance drops to zero.
        eps: Added to hardness before the power so zero-loss samples keep a small priority.
        beta: Importance-weight exponent in [0, 1]; 1 (the default) makes the weighted
            gradient unbiased, 0 gives all weights 1, a plain hard bias: slightly better on
            clean data, but on noisy labels it over-samples the mislabeled samples the noise
            guard has not flagged yet (measured: README, the frontier's `half` and
            `half_weighted` ablations).
        anneal_frac: Fraction of `total_rounds` at the end that is sampled uniformly (InfoBatch
            uses 0.125). 0 turns annealing off.
        total_rounds: Rounds in the whole training run; needed when `anneal_frac > 0`.
        hardness: Which table field is the hardness: "ema" (current hardness) or "last_loss".
        priority: How hardness h becomes priority before the power `alpha`: "loss" (h itself:
            the hardest first) or "uncertain" (`e^-h (1 - e^-h)`: for a cross-entropy loss,
            `p (1 - p)` with p the probability of the label, Active Bias's uncertainty). With
            "uncertain" a sample the model gets confidently wrong (h >> ln 2, often a flipped
            label) ranks as low as one it gets right, so hard-biased plans do not over-sample
            the label errors the noise guard has not flagged yet.
        strata: Priority bins a round is stratified into (more: closer to the exact target).
        suspect_scorings: Scorings before a sample can be a suspected label error (or the round
            of its last scoring, whichever comes first: see `hardness.SuspectRule`).
        suspect_factor: A sample whose hardness and last loss stay above this many times the
            run's median hardness (and above `suspect_floor`) is suspect (see
            `hardness.SuspectRule`); 0 turns the noise guard off.
        suspect_floor: The suspect level never goes below this (2.3 ~ ln 10: the label gets
            under 10% probability; see `hardness.SuspectRule`).
        suspect_min_share: The guard engages only when at least this share of the scored
            samples would be suspect (fewer are as often hard correct samples).
        size_factor: Adaptive plan size: a round trains on this many times the share of the
            scored samples carrying `size_mass` of their last losses (capped at the round);
            the rest of its slots are `SKIP`. 0 (the default) trains every slot.
        size_mass: Share of the total last loss the adaptive size counts samples for (the
            loss filter's `min_loss_perc`).
        size_min: The adaptive size never goes below this share of the round.
        packed: With an adaptive size, pack the samples a round trains into full batches (a
            round of fewer steps; schedules follow the worker's progress, not its step
            count) rather than keep every batch and shrink them.
        seed: Seeds the rounds' random streams (with the round and world size); None seeds
            them from the run's name. A `Driver` sets the workers' seed, so two runs of one
            seed get the same plans whatever they are called.
    """

    alpha: float = 1.0
    lam: float = 0.1
    eps: float = 1e-3
    beta: float = 1.0
    anneal_frac: float = 0.0
    total_rounds: int | None = None
    hardness: str = "ema"
    priority: str = "loss"
    strata: int = 16
    suspect_scorings: int = 4
    suspect_factor: float = 4.0
    suspect_floor: float = 2.3
    suspect_min_share: float = 0.02
    size_factor: float = 0.0
    size_mass: float = 0.9
    size_min: float = 0.05
    packed: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha <= 16.0):
            raise ValueError(f"alpha must be in [0, 16], got {self.alpha}")
        if not (math.isfinite(self.lam) and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if not (math.isfinite(self.eps) and self.eps > 0.0):
            raise ValueError(f"eps must be a positive finite number, got {self.eps}")
        if not (math.isfinite(self.beta) and 0.0 <= self.beta <= 1.0):
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not (math.isfinite(self.anneal_frac) and 0.0 <= self.anneal_frac <= 1.0):
            raise ValueError(f"anneal_frac must be in [0, 1], got {self.anneal_frac}")
        if self.total_rounds is not None and self.total_rounds < 1:
            raise ValueError(f"total_rounds must be >= 1, got {self.total_rounds}")
        if self.anneal_frac > 0.0 and self.total_rounds is None:
            raise ValueError("anneal_frac > 0 needs total_rounds")
        if self.hardness not in HARDNESS_FIELDS:
            raise ValueError(f"hardness must be one of {HARDNESS_FIELDS}, got {self.hardness!r}")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {self.priority!r}")
        if not 1 <= self.strata <= 256:
            raise ValueError(f"strata must be in [1, 256], got {self.strata}")
        if self.suspect_scorings < 1:
            raise ValueError(f"suspect_scorings must be >= 1, got {self.suspect_scorings}")
        if not (math.isfinite(self.suspect_factor) and self.suspect_factor >= 0.0):
            raise ValueError(f"suspect_factor must be >= 0, got {self.suspect_factor}")
        if not math.isfinite(self.suspect_floor):
            raise ValueError(f"suspect_floor must be finite, got {self.suspect_floor}")
        if not 0.0 <= self.suspect_min_share <= 1.0:
            raise ValueError(f"suspect_min_share must be in [0, 1], got {self.suspect_min_share}")
        if not (math.isfinite(self.size_factor) and 0.0 <= self.size_factor <= 1e3):
            raise ValueError(f"size_factor must be in [0, 1000], got {self.size_factor}")
        if not (math.isfinite(self.size_mass) and 0.0 < self.size_mass <= 1.0):
            raise ValueError(f"size_mass must be in (0, 1], got {self.size_mass}")
        if not (math.isfinite(self.size_min) and 0.0 < self.size_min <= 1.0):
            raise ValueError(f"size_min must be in (0, 1], got {self.size_min}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    def suspect_rule(self) -> SuspectRule | None:
        """The noise guard's rule, or None when it is off."""
        if self.suspect_factor == 0.0:
            return None
        return SuspectRule(self.suspect_scorings, self.suspect_factor, self.suspect_floor,
                           self.suspect_min_share)

    @property
    def weighs_samples(self) -> bool:
        """Whether a worker must apply this config's plan weights: importance weights
        (`beta > 0`), weight 0 for suspects (the noise guard) or `SKIP` (an adaptive size)."""
        return self.beta > 0 or self.suspect_rule() is not None or self.size_factor > 0

    def is_uniform_round(self, round_: int) -> bool:
        """Whether `round_` falls in the annealed (uniform) tail of training."""
        if self.anneal_frac <= 0.0 or self.total_rounds is None:
            return False
        return round_ >= math.ceil((1.0 - self.anneal_frac) * self.total_rounds)


@dataclass(frozen=True)
class PrioritySnapshot:
    """One hardness snapshot, stratified so each round costs O(round size).

    Build it with `PrioritySnapshot.build`; it holds no reference to the table it came from.

    Attributes:
        config: The plan config it was built with.
        n: Number of samples (ids 0..n-1).
        unseen: Ids never scored, ascending.
        suspect: Bool per id: a suspected label error (never trained on, weight 0).
        members: Ids of the scored, non-suspect samples grouped by stratum (stable order).
        bounds: `members[bounds[s]:bounds[s + 1]]` is stratum s.
        q_mean: Mean target probability `q` of each stratum (float64).
        suspects: Ids of the suspects, ascending.
        version: Caller's tag for the table state this came from.
        concentration: Share of the scored, non-suspect samples that carry `size_mass` of
            their last losses (largest first); 1 when none is scored or the size is not
            adaptive.
    """

    config: PlanConfig
    n: int
    unseen: np.ndarray
    suspect: np.ndarray
    members: np.ndarray
    bounds: np.ndarray
    q_mean: np.ndarray
    suspects: np.ndarray
    version: int = 0
    concentration: float = 1.0

    @classmethod
    def build(
        cls,
        hardness: np.ndarray,
        seen: np.ndarray,
        config: PlanConfig,
        version: int = 0,
        suspect: np.ndarray | None = None,
        last_loss: np.ndarray | None = None,
    ) -> PrioritySnapshot:
        """Stratify a hardness array.

        Args:
            hardness: Per-sample hardness, shape (N,). Negative values count as 0; NaN/inf on a
                seen sample counts as the maximum (a sample whose loss blew up is hard).
            seen: Times each sample was scored, shape (N,); 0 means never scored.
            config: Plan config.
            version: Tag for the table state, stored on the snapshot.
            suspect: Bool per sample, suspected label errors (see `hardness.SuspectRule`);
                None: no suspects.
            last_loss: Each sample's last scored loss, what the adaptive size measures the
                concentration of (the filter sees last losses: an average over past scorings
                stays spread long after they concentrate); None: the hardness.

        Raises:
            ValueError: Empty or mismatched arrays.

        Example:
            >>> h = np.array([0.01, 0.02, 2.0, 3.0], dtype=np.float32)
            >>> snap = PrioritySnapshot.build(h, np.ones(4), PlanConfig(strata=2))
            >>> [len(snap.stratum(s)) for s in range(2)]
            [2, 2]
        """
        h_in = np.asarray(hardness)
        seen_in = np.asarray(seen)
        if h_in.ndim != 1 or seen_in.shape != h_in.shape:
            raise ValueError(
                f"hardness and seen must be 1-d arrays of one length, got {h_in.shape} and "
                f"{seen_in.shape}"
            )
        n = int(h_in.shape[0])
        if n == 0:
            raise ValueError("cannot compose plans for an empty table")
        sus = (np.zeros(n, dtype=bool) if suspect is None
               else np.asarray(suspect, dtype=bool).copy())
        if sus.shape != (n,):
            raise ValueError(f"suspect must have shape ({n},), got {sus.shape}")
        is_seen = seen_in > 0
        sus &= is_seen
        eligible = is_seen & ~sus
        h = h_in.astype(np.float32, copy=True)
        finite = np.isfinite(h)
        np.maximum(h, 0.0, out=h)
        usable = eligible & finite
        h_max = float(np.max(h, where=usable, initial=0.0))
        np.copyto(h, np.float32(h_max), where=~finite)
        concentration = 1.0
        if config.size_factor > 0:
            last = h if last_loss is None else np.asarray(last_loss)
            concentration = mass_share(last[eligible], config.size_mass)
        if config.priority == "uncertain":
            # p (1 - p) = p - p^2 with p = e^-h, in place (h is our copy); a blown-up loss
            # (h = h_max) counts as confidently wrong.
            np.negative(h, out=h)
            np.exp(h, out=h)
            h -= h * h
            h_max = float(np.max(h, where=usable, initial=0.0))
        ids = np.flatnonzero(eligible)
        strata = config.strata
        if config.alpha == 0.0 or len(ids) == 0:
            p = np.ones(len(ids), dtype=np.float32)
            key = np.zeros(len(ids), dtype=np.int16)
        else:
            # log p = alpha * log((h + eps) / (h_max + eps)) in [log p_min, 0]: equal-width bins
            # of log p, so priorities inside a stratum differ by a bounded factor. float32
            # throughout: 10M samples build in a fraction of a second.
            logp = h[ids]
            logp += np.float32(config.eps)
            np.log(logp, out=logp)
            logp -= np.float32(math.log(h_max + config.eps))
            logp *= np.float32(config.alpha)
            np.minimum(logp, np.float32(0.0), out=logp)
            lo = float(logp.min())
            width = -lo / strata if lo < 0 else 1.0
            scaled = (logp - np.float32(lo)) * np.float32(1.0 / width)
            np.clip(scaled, 0, strata - 1, out=scaled)
            key = scaled.astype(np.int16)
            p = np.exp(logp, out=logp)
        # A stable sort of small ints is a radix sort in numpy: O(N).
        order = np.argsort(key, kind="stable")
        members = ids[order]
        counts = np.bincount(key, minlength=strata)
        bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        p_sum = np.bincount(key, weights=p, minlength=strata)
        n_elig = max(len(ids), 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            p_mean = np.where(counts > 0, p_sum / np.maximum(counts, 1), 0.0)
        total_p = float(p.sum()) or 1.0
        q_mean = (1.0 - config.lam) * p_mean / total_p + config.lam / n_elig
        return cls(
            config=config, n=n, unseen=np.flatnonzero(~is_seen), suspect=sus, members=members,
            bounds=bounds, q_mean=q_mean, suspects=np.flatnonzero(sus), version=version,
            concentration=concentration,
        )

    def stratum(self, s: int) -> np.ndarray:
        """Ids of stratum s (lowest priority first)."""
        return self.members[self.bounds[s]:self.bounds[s + 1]]

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.bounds)

    @property
    def share(self) -> float:
        """Share of a round's slots it trains: 1, or with an adaptive size
        `size_factor x concentration`, at least `size_min`."""
        cfg = self.config
        if cfg.size_factor <= 0 or self.concentration >= 1.0:
            return 1.0
        return min(1.0, max(cfg.size_min, cfg.size_factor * self.concentration))

    def trained(self, need: int, batches: int) -> int:
        """Ids a round of `need` slots in `batches` batches (over all ranks) trains on:
        `share` of them, and at least one per batch."""
        share = self.share
        if share >= 1.0:
            return need
        return min(need, max(batches, math.ceil(share * need)))

    def allocate(self, slots: int) -> np.ndarray:
        """Expected ids each stratum gives to `slots` places (float64, summing to
        min(slots, members)).

        The inclusion probability `pi_s = min(1, c q_s)` with `c` set so `sum n_s pi_s = slots`
        (strata that would exceed 1 are capped and the rest re-solved); stratum s's expected
        count is `n_s pi_s`. A round rounds these to integers at random (`_round_counts`), so
        the inclusion probability of every member is exactly `pi_s`, also for strata expecting
        less than one id.
        """
        sizes = self.sizes.astype(np.float64)
        slots = min(slots, int(sizes.sum()))
        pi = np.zeros(len(sizes))
        if slots <= 0:
            return pi
        capped = np.zeros(len(sizes), dtype=bool)
        live = sizes > 0
        for _ in range(len(sizes) + 1):
            free = live & ~capped
            left = slots - sizes[capped].sum()
            mass = float((sizes[free] * self.q_mean[free]).sum())
            pi[:] = 0.0
            pi[capped] = 1.0
            if mass > 0:
                pi[free] = left * self.q_mean[free] / mass
            over = free & (pi > 1.0)
            if not over.any():
                break
            capped |= over
        return sizes * np.minimum(pi, 1.0)


def mass_share(values: np.ndarray, mass: float, bins: int = 1024) -> float:
    """Share of `values`, largest first, that carry `mass` of their sum.

    O(N), no sort: a histogram of log values, summed from the top bin down, interpolated
    inside the bin where the mass is reached (exact to a bin's width, a factor of
    `(max/min) ** (1/bins)` in value). Negative values count as 0 and NaN/inf as the largest
    finite value, as in `PrioritySnapshot.build`. 1 for an empty or all-zero input.

    Example:
        >>> float(mass_share(np.array([9.0, 0.5, 0.5]), 0.9))  # 9 of 10 is in one of three
        0.3333333333333333
    """
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    if not finite.all():
        v = np.where(finite, v, np.max(v, where=finite, initial=0.0))
    v = np.maximum(v, 0.0)
    total = float(v.sum())
    if len(v) == 0 or not total > 0:
        return 1.0
    pos = v[v > 0]
    logs = np.log(pos)
    lo, hi = float(logs.min()), float(logs.max())
    if hi - lo < 1e-12:  # all equal: the mass is spread evenly
        return min(1.0, math.ceil(mass * len(pos)) / len(v))
    idx = np.minimum(((logs - lo) * (bins / (hi - lo))).astype(np.int64), bins - 1)
    counts = np.bincount(idx, minlength=bins)[::-1]
    sums = np.bincount(idx, weights=pos, minlength=bins)[::-1]
    cum = np.cumsum(sums)
    b = int(np.searchsorted(cum, mass * total - 1e-12 * total))
    before = cum[b - 1] if b > 0 else 0.0
    frac = (mass * total - before) / sums[b] if sums[b] > 0 else 0.0
    n = float(counts[:b].sum()) + math.ceil(min(max(frac, 0.0), 1.0) * counts[b])
    return min(1.0, n / len(v))


def _round_counts(expected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer counts with the given expectations and their (integer) sum, at random.

    Systematic rounding: the fractional parts laid end to end, one uniform offset, a unit at
    every integer crossing. Each count is floor or ceil of its expectation, E[count] equals the
    expectation exactly, and the counts always add up to the total.
    """
    base = np.floor(expected)
    frac = expected - base
    total = int(round(float(frac.sum())))
    if total == 0:
        return base.astype(np.int64)
    edges = np.concatenate([[0.0], np.cumsum(frac)])
    edges *= total / edges[-1]  # float error must not lose or add a unit
    hits = np.floor(edges - rng.random())
    return (base + np.diff(hits)).astype(np.int64)


@dataclass(frozen=True)
class RoundPlan:
    """The ids (and weights) of every rank for one round.

    Attributes:
        ids: int64 array of shape (world_size, batches, batch_size), ids disjoint.
        weights: float32 array of the same shape: importance weights (1 when beta == 0 or the
            round is uniform), 0 for suspects, whom the worker must not train on, `SKIP` for
            slots not trained.
        round: Round number.
        world_size: Number of ranks.
        uniform: Whether this round was annealed to uniform sampling.
        version: Version tag of the snapshot it came from.
        asked: Batches per rank the round was asked for (`batches` is fewer when packed); 0:
            `batches`.
    """

    ids: np.ndarray
    weights: np.ndarray
    round: int
    world_size: int
    uniform: bool = False
    version: int = 0
    asked: int = 0

    def __post_init__(self) -> None:
        if self.asked == 0:
            object.__setattr__(self, "asked", int(self.ids.shape[1]))

    @property
    def batches(self) -> int:
        return int(self.ids.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.ids.shape[2])

    def for_rank(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (ids, weights), each of shape (batches, batch_size)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return self.ids[rank], self.weights[rank]


def round_rng(seed: int, round_: int, world_size: int) -> np.random.Generator:
    """The random stream of one round: a function of (seed, round, world size) only."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, round_, world_size])))


def validate_round_shape(n: int, world_size: int, batches: int, batch_size: int) -> int:
    """Check a round fits in a table of `n` samples; return the ids it needs.

    Raises:
        ValueError: Non-positive sizes, or more ids than the table holds (a round is drawn
            without replacement).
    """
    for name, value in (("world_size", world_size), ("batches", batches),
                        ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    need = world_size * batches * batch_size
    if need > n:
        raise ValueError(
            f"a round of {world_size} ranks x {batches} batches x {batch_size} needs {need} "
            f"distinct ids but the table has only {n}; ask for fewer batches"
        )
    return need


def compose_round(
    snapshot: PrioritySnapshot,
    *,
    seed: int,
    round_: int,
    world_size: int,
    batches: int,
    batch_size: int,
) -> RoundPlan:
    """Compose one round for all ranks from a stratified snapshot.

    Args:
        snapshot: The stratified hardness snapshot.
        seed: The run's seed.
        round_: Round number (>= 0).
        world_size: Number of ranks sharing the round.
        batches: Batches per rank.
        batch_size: Ids per batch.

    Returns:
        The round; `plan.for_rank(r)` gives rank r's part.

    Raises:
        ValueError: Bad sizes, a negative round or seed, or a round bigger than the table.

    Example:
        >>> h = np.linspace(0.0, 2.0, 1000).astype(np.float32)
        >>> snap = PrioritySnapshot.build(h, np.ones(1000), PlanConfig())
        >>> plan = compose_round(snap, seed=0, round_=1, world_size=2, batches=3, batch_size=100)
        >>> plan.ids.shape, bool(abs(plan.weights.sum() - 600) < 30)  # weights average ~1
        ((2, 3, 100), True)
    """
    if round_ < 0:
        raise ValueError(f"round must be >= 0, got {round_}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    need = validate_round_shape(snapshot.n, world_size, batches, batch_size)
    rng = round_rng(seed, round_, world_size)
    uniform = snapshot.config.is_uniform_round(round_)
    train = need if uniform else snapshot.trained(need, world_size * batches)
    packed = snapshot.config.packed and train < need
    if packed:  # every rank trains the same count, so every rank gets the same batches
        train = min(need, world_size * math.ceil(train / world_size))
    if uniform:
        chosen = rng.choice(snapshot.n, size=need, replace=False, shuffle=False).astype(np.int64)
        weights = np.ones(need, dtype=np.float32)
    else:
        chosen, weights = _choose(snapshot, rng, train)
    weights[snapshot.suspect[chosen]] = 0.0
    shape = (world_size, batches, batch_size)
    if packed:
        per_rank = train // world_size
        shape = (world_size, math.ceil(per_rank / batch_size), batch_size)
        ids, weights = _packed(chosen, weights, snapshot.n, shape, rng)
    elif train < need:
        ids, weights = _with_skips(chosen, weights, snapshot.n, need, world_size * batches, rng)
    else:
        # Spread the unseen, the hardest and the suspects evenly over ranks and batches.
        order = rng.permutation(need)
        ids, weights = chosen[order], weights[order]
    return RoundPlan(
        ids=ids.reshape(shape),
        weights=weights.reshape(shape),
        round=round_,
        world_size=world_size,
        uniform=uniform,
        version=snapshot.version,
        asked=batches,
    )


def _packed(chosen: np.ndarray, weights: np.ndarray, n: int, shape: tuple[int, int, int],
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The chosen ids (a multiple of the ranks) in full batches, rank by rank; the tail of
    each rank's last batch is filled with ids not chosen, marked `SKIP`, so a round's ids stay
    distinct and ranks disjoint. Every rank's last batch trains at least one id."""
    world, batches, batch_size = shape
    per_rank = len(chosen) // world
    order = rng.permutation(len(chosen))
    ids = np.empty((world, batches * batch_size), dtype=np.int64)
    w = np.full((world, batches * batch_size), SKIP, dtype=np.float32)
    ids[:, :per_rank] = chosen[order].reshape(world, per_rank)
    w[:, :per_rank] = weights[order].reshape(world, per_rank)
    pad = batches * batch_size - per_rank
    if pad:
        free = np.ones(n, dtype=bool)
        free[chosen] = False
        pool = np.flatnonzero(free)
        fill = pool[rng.choice(len(pool), size=world * pad, replace=False, shuffle=False)]
        ids[:, per_rank:] = fill.reshape(world, pad)
    return ids.ravel(), w.ravel()


def _with_skips(chosen: np.ndarray, weights: np.ndarray, n: int, need: int, slots: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The round's `need` slots in `slots` batches: the chosen ids dealt out in turn, so
    every batch trains on the same count +- 1, and the other slots filled with ids not chosen,
    marked `SKIP` (a round's ids stay distinct, and ranks disjoint). O(N)."""
    per = need // slots
    order = rng.permutation(len(chosen))
    j = np.arange(len(chosen))
    at = (j % slots) * per + j // slots  # flat index into (slots, per)
    ids = np.empty(need, dtype=np.int64)
    w = np.full(need, SKIP, dtype=np.float32)
    ids[at], w[at] = chosen[order], weights[order]
    free = np.ones(n, dtype=bool)
    free[chosen] = False
    pool = np.flatnonzero(free)
    rest = np.ones(need, dtype=bool)
    rest[at] = False
    ids[rest] = pool[rng.choice(len(pool), size=need - len(chosen), replace=False,
                                shuffle=False)]
    return ids, w


def _choose(snapshot: PrioritySnapshot, rng: np.random.Generator,
            need: int) -> tuple[np.ndarray, np.ndarray]:
    """Unseen ids first, then each stratum's share, then suspects at the floor rate."""
    cfg = snapshot.config
    unseen = snapshot.unseen
    if len(unseen) >= need:
        pick = rng.choice(len(unseen), size=need, replace=False, shuffle=False)
        return unseen[pick].astype(np.int64), np.ones(need, dtype=np.float32)
    sizes = snapshot.sizes
    n_elig = int(sizes.sum())
    rest = need - len(unseen)
    # Suspects get what the uniform floor would give them, and at least what the strata
    # cannot take (a round may be larger than the non-suspect samples).
    floor_rate = cfg.lam * rest / max(n_elig + len(snapshot.suspects), 1)
    n_sus = min(len(snapshot.suspects),
                max(int(round(floor_rate * len(snapshot.suspects))), rest - n_elig))
    expected = snapshot.allocate(rest - n_sus)
    counts = _round_counts(expected, rng)
    scale = need / snapshot.n  # the uniform inclusion probability M / N
    ids = [unseen.astype(np.int64)]
    ws = [np.full(len(unseen), scale ** cfg.beta, dtype=np.float32)]
    for s, m in enumerate(counts.tolist()):
        if m == 0:
            continue
        members = snapshot.stratum(s)
        pick = rng.choice(len(members), size=m, replace=False, shuffle=False)
        ids.append(members[pick].astype(np.int64))
        # 1 / pi_s with pi_s = E[m_s] / n_s, the inclusion probability (not this round's m_s).
        ws.append(np.full(m, (scale * len(members) / expected[s]) ** cfg.beta,
                          dtype=np.float32))
    if n_sus:
        pick = rng.choice(len(snapshot.suspects), size=n_sus, replace=False, shuffle=False)
        ids.append(snapshot.suspects[pick].astype(np.int64))
        ws.append(np.zeros(n_sus, dtype=np.float32))
    return np.concatenate(ids), np.concatenate(ws)
