"""Plan composition: which sample ids every rank trains on next (design.md §5).

A *round* is one call of `compose_round`: it picks `world_size * batches * batch_size` distinct
ids for all ranks at once and splits them disjointly, so every rank gets the same number of
batches and no id goes to two ranks. A rank's plan is its slice of the round.

How ids are picked, for a hardness snapshot `h` (e.g. the moving average of each sample's loss):

- priority `p_i = ((h_i + eps) / (max h + eps)) ** alpha` (the division only keeps the float32
  power from overflowing; scaling every priority by one constant changes nothing);
- samples never scored get the maximum priority and, beyond that, come first: a round takes
  every unseen sample before any seen one (a random subset of them when there are more than the
  round needs);
- target distribution `q_i = (1 - lam) p_i / sum(p) + lam / N`, a uniform floor so nothing
  starves;
- the rest of the round is *successive sampling without replacement* from `q`: draw with
  replacement, drop ids already taken, keep the first distinct ones in draw order. That is exactly
  the same distribution as Efraimidis–Spirakis keys, but costs a binary search per draw in a
  cumulative sum that is cached per snapshot, instead of a pass over all N samples per round;
- optional importance weights `w_i = (N q_i) ** -beta / max_j (N q_j) ** -beta`, normalised by
  the largest weight over the whole table so every rank of a round uses the same scale;
- optional annealing: rounds in the last `anneal_frac` of `total_rounds` are uniform (weights 1);
- deterministic: the random stream is seeded from (seed, round, world size) only, so the same
  snapshot gives the same round after a restart.

Everything here is pure numpy: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Hardness fields a plan can be biased by.
HARDNESS_FIELDS = ("ema", "last_loss")

# Ids per block of the two-level search (see `_search`): 2**7 float64 = 1 KiB of cdf per block.
_BLOCK_BITS = 7
_BLOCK = 1 << _BLOCK_BITS

# Below this acceptance rate the rejection loop is wasting draws on ids already taken; it then
# rebuilds the cumulative sum without them (still exact: it is the same conditional law).
_MIN_ACCEPTANCE = 0.3


@dataclass(frozen=True)
class PlanConfig:
    """How strongly plans lean toward hard samples.

    Attributes:
        alpha: Priority exponent; 0 gives uniform plans, larger values favour hard samples more.
        lam: Uniform floor in [0, 1]: the share of the target distribution spread evenly over all
            samples, so no sample's chance drops to zero.
        eps: Added to hardness before the power so zero-loss samples keep a small priority.
        beta: Importance-weight exponent in [0, 1]; 0 gives all weights 1, 1 fully corrects the
            bias toward hard samples.
        anneal_frac: Fraction of `total_rounds` at the end that is sampled uniformly (InfoBatch
            uses 0.125). 0 turns annealing off.
        total_rounds: Rounds in the whole training run; needed when `anneal_frac > 0`.
        hardness: Which table field is the hardness: "ema" (moving average) or "last_loss".
    """

    alpha: float = 1.0
    lam: float = 0.1
    eps: float = 1e-3
    beta: float = 0.0
    anneal_frac: float = 0.0
    total_rounds: int | None = None
    hardness: str = "ema"

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

    def is_uniform_round(self, round_: int) -> bool:
        """Whether `round_` falls in the annealed (uniform) tail of training."""
        if self.anneal_frac <= 0.0 or self.total_rounds is None:
            return False
        return round_ >= math.ceil((1.0 - self.anneal_frac) * self.total_rounds)


@dataclass(frozen=True)
class PrioritySnapshot:
    """Priorities of one hardness snapshot, precomputed so each round costs O(round size).

    Build it with `PrioritySnapshot.build`; it holds no reference to the table it came from.

    Attributes:
        config: The plan config the priorities were built with.
        n: Number of samples (ids 0..n-1).
        cdf: Cumulative sum (float64) of the priorities of *seen* samples, unseen ones count 0:
            unseen samples are always taken before the sampling that uses it.
        block_ends: `cdf` at the end of every block of `_BLOCK` ids: a small index that stays in
            cache, so a draw costs one search in it and a few probes in one block of `cdf`.
        unseen: Ids never scored, ascending.
        hardness: float32 hardness per id (clipped to >= 0; unseen and non-finite -> max).
        p_seen_total: Sum of seen priorities (== cdf[-1]).
        p_total: Sum of all priorities, unseen ones at the maximum priority.
        h_max: Largest finite hardness among seen samples (priority 1), 0 when none is seen.
        q_min: Smallest target probability over the table (sets the weight scale).
        version: Caller's tag for the table state this came from.
    """

    config: PlanConfig
    n: int
    cdf: np.ndarray
    block_ends: np.ndarray
    unseen: np.ndarray
    hardness: np.ndarray
    p_seen_total: float
    p_total: float
    h_max: float
    q_min: float
    version: int = 0

    @classmethod
    def build(
        cls,
        hardness: np.ndarray,
        seen: np.ndarray,
        config: PlanConfig,
        version: int = 0,
    ) -> PrioritySnapshot:
        """Precompute priorities from a hardness array and a times-seen array.

        Args:
            hardness: Per-sample hardness, shape (N,). Negative values count as 0; NaN/inf on a
                seen sample counts as the maximum (a sample whose loss blew up is hard).
            seen: Times each sample was scored, shape (N,); 0 means never scored.
            config: Plan config.
            version: Tag for the table state, stored on the snapshot.

        Raises:
            ValueError: Empty or mismatched arrays.
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
        is_seen = seen_in > 0
        h = h_in.astype(np.float32, copy=True)
        finite = np.isfinite(h)
        np.maximum(h, 0.0, out=h)
        usable = is_seen & finite
        h_max = float(np.max(h, where=usable, initial=0.0))
        # Unseen and non-finite samples sit at the top priority (1 after scaling).
        np.copyto(h, np.float32(h_max), where=~usable)
        if config.alpha == 0.0:
            p = np.ones(n, dtype=np.float32)
        else:
            # Scaled to (0, 1] before the power so float32 cannot overflow.
            p = (h + np.float32(config.eps)) / np.float32(h_max + config.eps)
            if config.alpha != 1.0:
                np.power(p, np.float32(config.alpha), out=p)
        np.copyto(p, np.float32(0.0), where=~is_seen)
        cdf = p.astype(np.float64)
        np.cumsum(cdf, out=cdf)
        unseen = np.flatnonzero(~is_seen)
        p_seen_total = float(cdf[-1])
        p_total = p_seen_total + 1.0 * len(unseen)
        # In float64 so a float32 underflow cannot make the weight scale infinite.
        p_min = ((float(h.min()) + config.eps) / (h_max + config.eps)) ** config.alpha
        q_min = (1.0 - config.lam) * p_min / p_total + config.lam / n
        return cls(
            config=config,
            n=n,
            cdf=cdf,
            block_ends=np.ascontiguousarray(cdf[_BLOCK - 1::_BLOCK]),
            unseen=unseen,
            hardness=h,
            p_seen_total=p_seen_total,
            p_total=p_total,
            h_max=h_max,
            q_min=q_min,
            version=version,
        )

    def target_probability(self, ids: np.ndarray) -> np.ndarray:
        """Target probability `q_i` of each id (float64), unseen ones at the top priority."""
        cfg = self.config
        h = self.hardness[ids].astype(np.float64)
        p = ((h + cfg.eps) / (self.h_max + cfg.eps)) ** cfg.alpha
        return (1.0 - cfg.lam) * p / self.p_total + cfg.lam / self.n

    def weights(self, ids: np.ndarray) -> np.ndarray:
        """Importance weights `(N q_i)^-beta`, divided by the largest over the table (float32)."""
        if self.config.beta == 0.0:
            return np.ones(len(ids), dtype=np.float32)
        q = self.target_probability(ids)
        w = (self.q_min / q) ** self.config.beta
        return np.minimum(w, 1.0).astype(np.float32)


@dataclass(frozen=True)
class RoundPlan:
    """The ids (and weights) of every rank for one round.

    Attributes:
        ids: int64 array of shape (world_size, batches, batch_size), ids disjoint.
        weights: float32 array of the same shape (all 1 when beta == 0 or the round is uniform).
        round: Round number.
        world_size: Number of ranks.
        uniform: Whether this round was annealed to uniform sampling.
        version: Version tag of the snapshot it came from.
    """

    ids: np.ndarray
    weights: np.ndarray
    round: int
    world_size: int
    uniform: bool = False
    version: int = 0

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
    """Compose one round for all ranks from a priority snapshot.

    Args:
        snapshot: Precomputed priorities.
        seed: The run's seed.
        round_: Round number (>= 0).
        world_size: Number of ranks sharing the round.
        batches: Batches per rank.
        batch_size: Ids per batch.

    Returns:
        The round; `plan.for_rank(r)` gives rank r's part.

    Raises:
        ValueError: Bad sizes, a negative round or seed, or a round bigger than the table.
    """
    if round_ < 0:
        raise ValueError(f"round must be >= 0, got {round_}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    need = validate_round_shape(snapshot.n, world_size, batches, batch_size)
    rng = round_rng(seed, round_, world_size)
    uniform = snapshot.config.is_uniform_round(round_)
    if uniform:
        chosen = rng.choice(snapshot.n, size=need, replace=False, shuffle=True).astype(np.int64)
        weights = np.ones(need, dtype=np.float32)
    else:
        chosen = _choose(snapshot, rng, need)
        # Spread the unseen (and the hardest) evenly over ranks and batches.
        rng.shuffle(chosen)
        weights = snapshot.weights(chosen)
    shape = (world_size, batches, batch_size)
    return RoundPlan(
        ids=chosen.reshape(shape),
        weights=weights.reshape(shape),
        round=round_,
        world_size=world_size,
        uniform=uniform,
        version=snapshot.version,
    )


def _choose(snapshot: PrioritySnapshot, rng: np.random.Generator, need: int) -> np.ndarray:
    """Unseen ids first, then successive sampling without replacement from q."""
    unseen = snapshot.unseen
    if len(unseen) >= need:
        pick = rng.choice(len(unseen), size=need, replace=False, shuffle=False)
        return unseen[pick].astype(np.int64)
    rest = _successive_sample(snapshot, rng, need - len(unseen))
    return np.concatenate([unseen.astype(np.int64), rest])


def _search(snapshot: PrioritySnapshot, u: np.ndarray) -> np.ndarray:
    """For each u, the first id i with cdf[i] > u (the id whose priority interval holds u).

    A plain `searchsorted` over a 10M-entry cdf walks 24 levels of dependent cache misses per
    draw. Here one search in `block_ends` (small, cached) finds the block, then a branch-free
    binary search of `_BLOCK_BITS` steps runs for all draws at once inside their blocks.
    """
    cdf = snapshot.cdf
    n = len(cdf)
    lo = np.searchsorted(snapshot.block_ends, u, side="right") << _BLOCK_BITS
    np.minimum(lo, n - 1, out=lo)
    hi = np.minimum(lo + (_BLOCK - 1), n - 1)
    for _ in range(_BLOCK_BITS):
        mid = (lo + hi) >> 1
        right = cdf[mid] <= u
        lo = np.where(right, mid + 1, lo)
        hi = np.where(right, hi, mid)
    return lo


def _successive_sample(snapshot: PrioritySnapshot, rng: np.random.Generator, k: int) -> np.ndarray:
    """Draw k distinct seen ids with probability proportional to q, without replacement.

    With the unseen all taken, q restricted to seen ids is the mixture of the priority
    component (cdf over seen ids) with weight a = (1 - lam) * P_seen / P_total and the uniform
    component over all N with weight lam (hits on taken ids are rejected like any repeat).
    """
    cfg = snapshot.config
    n = snapshot.n
    total = float(snapshot.cdf[-1])
    a = (1.0 - cfg.lam) * snapshot.p_seen_total / snapshot.p_total
    uniform_share = cfg.lam / (a + cfg.lam) if a + cfg.lam > 0 else 1.0
    taken = snapshot.unseen  # sorted; grows (still sorted) with every accepted batch
    out: list[np.ndarray] = []
    have = 0
    drawn = accepted = 0
    while have < k:
        left = k - have
        m = left + left // 8 + 16
        ids = np.empty(m, dtype=np.int64)
        from_uniform = rng.random(m) < uniform_share
        n_uniform = int(from_uniform.sum())
        ids[from_uniform] = rng.integers(0, n, size=n_uniform)
        # The priority draws are made as sorted uniforms (normalised sums of exponentials are
        # the order statistics of iid uniforms), which keeps the searches cache-friendly, then
        # put in a random order: together exactly iid draws, with no sort.
        spacing = np.cumsum(rng.standard_exponential(m - n_uniform + 1))
        u = spacing[:-1] * (total / spacing[-1])
        ids[~from_uniform] = _search(snapshot, u)[rng.permutation(m - n_uniform)]
        # First occurrence of each id in draw order, skipping ids taken earlier.
        uniq, first = np.unique(ids, return_index=True)
        if len(taken):
            pos = np.minimum(np.searchsorted(taken, uniq), len(taken) - 1)
            first = first[taken[pos] != uniq]
        first = np.sort(first)[:left]
        new = ids[first]
        out.append(new)
        taken = np.union1d(taken, new)
        have += len(new)
        drawn += m
        accepted += len(new)
        if have < k and drawn > 4 * k and accepted < _MIN_ACCEPTANCE * drawn:
            # Most draws hit taken ids: sample the rest from q restricted to untaken ids.
            out.append(_sample_untaken(snapshot, rng, k - have, taken))
            break
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def _sample_untaken(
    snapshot: PrioritySnapshot, rng: np.random.Generator, k: int, taken_ids: np.ndarray
) -> np.ndarray:
    """Exact fallback: successive sampling from q with the taken ids' mass removed."""
    cfg = snapshot.config
    taken = np.zeros(snapshot.n, dtype=bool)
    taken[taken_ids] = True
    p = np.diff(snapshot.cdf, prepend=0.0)
    q = (1.0 - cfg.lam) * p / snapshot.p_total + cfg.lam / snapshot.n
    q[taken] = 0.0
    free = int((~taken).sum())
    if free < k:  # guarded by validate_round_shape; kept as a clear error, not a hang
        raise ValueError(f"only {free} untaken ids left, need {k}")
    nz = np.flatnonzero(q > 0)
    if len(nz) < k:
        # Priorities underflowed to exactly 0 with lam == 0: fill uniformly from the rest.
        zero = np.flatnonzero((q == 0) & ~taken)
        extra = rng.choice(zero, size=k - len(nz), replace=False, shuffle=False)
        return np.concatenate([rng.permutation(nz), extra]).astype(np.int64)
    # Numpy's weighted choice without replacement is itself successive sampling.
    pick = rng.choice(len(nz), size=k, replace=False, p=q[nz] / q[nz].sum(), shuffle=False)
    return nz[pick].astype(np.int64)
