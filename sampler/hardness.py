"""The per-sample hardness table: dense arrays indexed by sample id, updated from loss records.

Each sample costs exactly 20 bytes: last loss (f32), the current hardness `ema` (f32), times
scored (u32), times kept by the filter (u16, saturating at 65,535), the round (epoch) of the
last record (u16) and the training step of the last record (u32). No dict or object per
sample, so 100M samples take 2 GB. The field arrays are numpy views (last_loss/ema and
seen/kept/last_round share words in memory, so an update touches fewer cache lines); copy one
with `.copy()` for a contiguous array.

The hardness is *current*: it decays by training progress, not per observation. A record of
round r for a sample last scored in round r0 blends `ema = a * ema + (1 - a) * loss` with
`a = ema_decay ** max(r - r0, 1)`, so a sample scored every round keeps a moving average with
weight `ema_decay` per round, and one scored again after k rounds keeps only `ema_decay ** k`
of what the model thought of it back then (with the default 0.5, a loss from 4 rounds ago
counts 6%). A per-observation average (the old rule) still ranked samples by their first-epoch
losses after a dozen epochs.

`SuspectRule` is the noise guard: a sample scored many times whose current hardness and last
loss both stay far above the run's median is more likely mislabeled than hard (RHO-LOSS's
observation, from history instead of a holdout model).

`HardnessTable.apply` is vectorized. A batch may name the same id more than once (a coalesced
report spanning several epochs of a small dataset); the result is then exactly, bit for bit,
what applying the records one at a time in order would give: duplicates are applied in rounds,
the k-th occurrence of every id in round k, each round with unique ids.

Pure numpy, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from hardbatch.sampler.records import as_columns

FIELDS: tuple[str, ...] = ("last_loss", "ema", "seen", "kept", "last_round", "last_step")
FIELD_DTYPES: dict[str, np.dtype[Any]] = {
    "last_loss": np.dtype("<f4"),
    "ema": np.dtype("<f4"),
    "seen": np.dtype("<u4"),
    "kept": np.dtype("<u2"),
    "last_round": np.dtype("<u2"),
    "last_step": np.dtype("<u4"),
}
BYTES_PER_SAMPLE = sum(d.itemsize for d in FIELD_DTYPES.values())  # 20

#: Weight of the old hardness per round of training since the sample was last scored.
DEFAULT_DECAY = 0.5

# One uint64 word per sample holds seen (bits 0-31), kept (32-47) and last_round (48-63).
_SEEN_MASK = np.uint64(0xFFFF_FFFF)
_KEPT_ONE = np.uint64(1 << 32)
_KEPT_MAX = 0xFFFF
_ROUND_SHIFT = np.uint64(48)
_ROUND_CLEAR = np.uint64((1 << 48) - 1)

# Ids are stored as u32 on the wire and steps as u32 in the table.
MAX_SAMPLES = 2**32 - 1
MAX_STEP = 2**32 - 1
MAX_ROUND = 2**16 - 1  # the record's epoch field is u16


@dataclass(frozen=True)
class Rejections:
    """Counts of records that `split_valid` refused, by reason."""

    out_of_range: int = 0
    nonfinite: int = 0

    @property
    def total(self) -> int:
        return self.out_of_range + self.nonfinite

    def __add__(self, other: Rejections) -> Rejections:
        return Rejections(self.out_of_range + other.out_of_range, self.nonfinite + other.nonfinite)


def as_batch(
    ids: Any, losses: Any, kept: Any, step: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checks shapes and types of one batch and returns it as numpy arrays.

    Args:
        ids: 1-D integer sample ids.
        losses: 1-D losses, same length.
        kept: 1-D bool mask (did the filter keep the sample), same length.
        step: one training step for the whole batch, or one per record.

    Returns:
        `(ids int64, losses float32, kept bool, step uint32)`, step broadcast to the batch.

    Raises:
        ValueError: wrong dimensions, mismatched lengths, non-integer ids, or a step that is
            negative or does not fit in 32 bits.
    """
    ids_a, losses_a, kept_a = as_columns(ids, losses, kept)
    n = len(ids_a)
    step_a = np.asarray(step)
    if step_a.ndim not in (0, 1) or (step_a.ndim == 1 and len(step_a) != n):
        raise ValueError(f"step must be a scalar or one per record, got shape {step_a.shape}")
    if step_a.size and step_a.dtype.kind not in "iu":
        raise ValueError(f"step must be an integer, got dtype {step_a.dtype}")
    if step_a.size and (int(step_a.min()) < 0 or int(step_a.max()) > MAX_STEP):
        raise ValueError(f"step must be in [0, {MAX_STEP}]")
    return (
        ids_a.astype(np.int64, copy=False),
        losses_a.astype(np.float32, copy=False),
        kept_a.astype(bool, copy=False),
        np.broadcast_to(step_a.astype(np.uint32, copy=False), (n,)),
    )


def as_rounds(round_: Any, n: int) -> np.ndarray:
    """Checks the round(s) of a batch of `n` records; returns one u16 per record."""
    r = np.asarray(round_)
    if r.ndim not in (0, 1) or (r.ndim == 1 and len(r) != n):
        raise ValueError(f"round must be a scalar or one per record, got shape {r.shape}")
    if r.size and r.dtype.kind not in "iu":
        raise ValueError(f"round must be an integer, got dtype {r.dtype}")
    if r.size and (int(r.min()) < 0 or int(r.max()) > MAX_ROUND):
        raise ValueError(f"round must be in [0, {MAX_ROUND}]")
    return np.broadcast_to(r.astype(FIELD_DTYPES["last_round"], copy=False), (n,))


def split_valid(
    ids: np.ndarray, losses: np.ndarray, size: int
) -> tuple[np.ndarray | None, Rejections]:
    """Finds the records a table of `size` samples can take.

    Returns:
        `(mask, rejections)`: mask is None when every record is valid (the common case, so no
        copy is needed), else a bool array selecting the valid ones.
    """
    in_range = (ids >= 0) & (ids < size)
    finite = np.isfinite(losses)
    ok = in_range & finite
    if ok.all():
        return None, Rejections()
    bad_range = int(np.count_nonzero(~in_range))
    # A record both out of range and non-finite counts once, as out of range.
    bad_loss = int(np.count_nonzero(in_range & ~finite))
    return ok, Rejections(out_of_range=bad_range, nonfinite=bad_loss)


def check_valid(ids: np.ndarray, losses: np.ndarray, size: int) -> None:
    """Raises ValueError naming the first bad record, if any."""
    mask, rej = split_valid(ids, losses, size)
    if mask is None:
        return
    i = int(np.flatnonzero(~mask)[0])
    if not 0 <= ids[i] < size:
        raise ValueError(
            f"{rej.out_of_range} sample id(s) outside [0, {size}), first {int(ids[i])} at {i}"
        )
    raise ValueError(f"{rej.nonfinite} non-finite loss(es), first {losses[i]} at index {i}")


def occurrence_rounds(ids: np.ndarray) -> list[np.ndarray] | None:
    """Splits a batch into rounds in which every id appears at most once.

    Returns:
        None when the ids are already unique; else a list of index arrays, round k holding the
        positions of the k-th occurrence of each id, each in original order.
    """
    n = len(ids)
    if n < 2:
        return None
    sorted_ids = np.sort(ids)
    if not (sorted_ids[1:] == sorted_ids[:-1]).any():
        return None
    order = np.argsort(ids, kind="stable")
    sid = ids[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = sid[1:] != sid[:-1]
    pos = np.arange(n)
    group_start = np.maximum.accumulate(np.where(starts, pos, 0))
    occ = np.empty(n, dtype=np.int64)
    occ[order] = pos - group_start
    by_round = np.argsort(occ, kind="stable")
    counts = np.bincount(occ)
    return np.split(by_round, np.cumsum(counts)[:-1])


class HardnessTable:
    """Dense per-sample hardness for `size` samples, 20 bytes each.

    Attributes:
        size: number of samples (ids 0..size-1).
        ema_decay: weight of the old hardness per round since the sample was last scored; the
            first record of a sample sets the hardness to its loss.
        last_loss, ema, seen, kept, last_round, last_step: the arrays, by sample id.
        applied: records applied so far.
    """

    #: Rounds since the last scoring beyond which the old hardness counts as fully forgotten.
    MAX_GAP = 4096

    def __init__(self, size: int, ema_decay: float = DEFAULT_DECAY) -> None:
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
            raise ValueError(f"size must be an int, got {size!r}")
        if not 0 < size <= MAX_SAMPLES:
            raise ValueError(f"size must be in [1, {MAX_SAMPLES}], got {size}")
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.size = int(size)
        self.ema_decay = float(ema_decay)
        # decay ** gap for every gap, made by repeated f32 products: a table lookup gives the
        # same bits whether records are applied one at a time or a million at once.
        keep = np.empty(self.MAX_GAP + 1, dtype=np.float32)
        keep[0] = 1.0
        for k in range(1, self.MAX_GAP + 1):
            keep[k] = keep[k - 1] * np.float32(ema_decay)
        self._keep = keep
        self._gain = (1.0 - keep.astype(np.float64)).astype(np.float32)
        # Fields updated together live side by side, so an update gathers and scatters one
        # 8-byte word per pair instead of two 4-byte ones: half the random memory accesses.
        self._losses = np.zeros((self.size, 2), dtype=np.float32)  # last_loss, ema
        self._counts64 = np.zeros(self.size, dtype="<u8")  # seen | kept | last_round
        self._losses64 = self._losses.view(np.uint64).reshape(self.size)
        halves = self._counts64.view("<u2").reshape(self.size, 4)
        self.last_loss: np.ndarray = self._losses[:, 0]
        self.ema: np.ndarray = self._losses[:, 1]
        self.seen: np.ndarray = self._counts64.view("<u4").reshape(self.size, 2)[:, 0]
        self.kept: np.ndarray = halves[:, 2]
        self.last_round: np.ndarray = halves[:, 3]
        self.last_step = np.zeros(self.size, dtype=FIELD_DTYPES["last_step"])
        self.applied = 0

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in FIELDS)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by field name (views, not copies)."""
        return {f: getattr(self, f) for f in FIELDS}

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], ema_decay: float = DEFAULT_DECAY, applied: int = 0
    ) -> HardnessTable:
        """Builds a table from the field arrays (copied), checking dtypes and lengths."""
        missing = set(FIELDS) - set(arrays)
        if missing:
            raise ValueError(f"missing fields: {sorted(missing)}")
        size = len(arrays["ema"])
        table = cls(size, ema_decay)
        for f in FIELDS:
            a = np.asarray(arrays[f])
            if a.shape != (size,):
                raise ValueError(f"field {f} has shape {a.shape}, expected ({size},)")
            getattr(table, f)[:] = a.astype(FIELD_DTYPES[f], copy=False)
        table.applied = int(applied)
        return table

    def copy(self) -> HardnessTable:
        return HardnessTable.from_arrays(self.arrays(), self.ema_decay, self.applied)

    def equals(self, other: HardnessTable) -> bool:
        """Bit-for-bit equality of all arrays (NaN-safe, since it compares bytes)."""
        return self.size == other.size and all(
            getattr(self, f).tobytes() == getattr(other, f).tobytes() for f in FIELDS
        )

    def apply(self, ids: Any, losses: Any, kept: Any, step: Any, round_: Any = 0) -> None:
        """Applies a batch of loss records, in order.

        Args:
            ids: sample ids, each in [0, size).
            losses: finite losses, one per id.
            kept: whether the filter kept each sample.
            step: training step, one for the batch or one per record.
            round_: training round (the record's epoch), one for the batch or one per record;
                the hardness decays by the rounds between two scorings of a sample.

        Raises:
            ValueError: bad shapes, an id out of range, a non-finite loss or a bad round. The
                table is left untouched: everything is checked before anything is written.

        Example:
            >>> t = HardnessTable(4, ema_decay=0.5)
            >>> t.apply([1], [4.0], [True], step=10, round_=0)
            >>> t.apply([1], [0.0], [False], step=90, round_=2)   # two rounds later
            >>> float(t.ema[1])                                   # 4 * 0.5**2
            1.0
        """
        ids_a, losses_a, kept_a, step_a = as_batch(ids, losses, kept, step)
        round_a = as_rounds(round_, len(ids_a))
        check_valid(ids_a, losses_a, self.size)
        self._apply_valid(ids_a, losses_a, kept_a, step_a, round_a)

    def apply_records(self, ids: np.ndarray, losses: np.ndarray, kept: np.ndarray,
                      step: np.ndarray, round_: np.ndarray) -> None:
        """`apply` for arrays already checked by `as_batch` and `split_valid` (the hot path);
        `round_` is one u16 per record."""
        self._apply_valid(ids, losses, kept, step, round_)

    def _apply_valid(self, ids: np.ndarray, losses: np.ndarray, kept: np.ndarray,
                     step: np.ndarray, round_: np.ndarray) -> None:
        rounds = occurrence_rounds(ids)
        if rounds is None:
            self._apply_unique(ids, losses, kept, step, round_)
        else:
            for idx in rounds:
                self._apply_unique(ids[idx], losses[idx], kept[idx], step[idx], round_[idx])
        self.applied += len(ids)

    def _apply_unique(self, ids: np.ndarray, losses: np.ndarray, kept: np.ndarray,
                      step: np.ndarray, round_: np.ndarray) -> None:
        m = len(ids)
        old = self._losses64[ids].view(np.float32).reshape(m, 2)
        counts = self._counts64[ids]
        first = (counts & _SEEN_MASK) == 0
        last = (counts >> _ROUND_SHIFT).astype(np.int64)
        # Rounds since the last scoring; a record of the same (or an older) round counts as
        # one, so repeated scorings inside a round still move the hardness.
        gap = round_.astype(np.int64) - last
        np.clip(gap, 1, self.MAX_GAP, out=gap)
        new = np.empty((m, 2), dtype=np.float32)
        new[:, 0] = losses
        # f32 throughout, so a vectorized round equals applying records one at a time.
        new[:, 1] = np.where(first, losses,
                             old[:, 1] * self._keep[gap] + losses * self._gain[gap])
        self._losses64[ids] = new.view(np.uint64).reshape(m)
        # 64-bit adds bump seen and kept (kept saturates, so it never carries into the round).
        counts += np.uint64(1)
        room = ((counts >> np.uint64(32)) & np.uint64(0xFFFF)) < _KEPT_MAX
        counts += (kept & room).astype(np.uint64) * _KEPT_ONE
        # Ranks report out of order; the latest round seen is what the next gap counts from.
        latest = np.where(first, round_.astype(np.int64), np.maximum(last, round_))
        counts &= _ROUND_CLEAR
        counts |= latest.astype(np.uint64) << _ROUND_SHIFT
        self._counts64[ids] = counts
        self.last_step[ids] = step

    def hardest(self, k: int, by: str = "ema") -> np.ndarray:
        """Ids of the k seen samples with the largest `by` value, hardest first."""
        if by not in ("ema", "last_loss"):
            raise ValueError(f"by must be 'ema' or 'last_loss', got {by!r}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        seen_ids = np.flatnonzero(self.seen)
        values = getattr(self, by)[seen_ids]
        k = min(k, len(seen_ids))
        if k == 0:
            return np.empty(0, dtype=np.int64)
        top = np.argpartition(-values, k - 1)[:k]
        top = top[np.argsort(-values[top], kind="stable")]
        return seen_ids[top].astype(np.int64)


@dataclass(frozen=True)
class SuspectRule:
    """When a sample counts as a suspected label error (the noise guard).

    A sample is suspect when it was scored at least `min_scorings` times, or last scored in
    round `min_scorings` or later (the model had that many rounds to learn it; plans over part
    of the data score a sample less often than once a round, and a flipped label they draw
    would otherwise be trained on until it is scored enough), and both its current
    hardness (`ema`, which mostly remembers its last two or three scorings) and its last loss
    are above `factor` times the run's reference level (the median current hardness of the
    scored samples): its loss stayed far above where most samples are, scoring after scoring.
    A correctly labelled hard sample gets learned and drops out; a flipped label stays high
    until the model memorizes it, which the plans prevent by giving suspects weight 0 (they
    are still scored now and then, so a sample the model comes to get right is cleared).

    The level is `max(factor * reference, floor)`. The floor matters on clean data, where the
    median loss goes to nearly 0 late in training and any multiple of it would flag ordinary
    hard samples. A flagged sample is never trained, so a hard but correct one stays flagged:
    the guard must not fire on it. With floor 1.0 (the model gives the label < 37%) it flagged
    ~150 of 50,000 clean MNIST-1D samples and cost ~0.1 point of final accuracy (12 epochs,
    3 seeds: 99.21% median, val loss 0.0253, against 99.31% / 0.0219 with the guard off);
    2.3 (~ln 10: the label gets < 10%, confidently wrong) flagged 44-58 and ended at 99.35% /
    0.0220. With 20% flipped labels it listed 9,878 at precision 0.997, recall 0.985 (floor
    1.0: 10,101 at 0.994 / 0.994), with the same final accuracy.

    The guard engages only when at least `min_share` of the scored samples match: a few
    matches are hard correct samples as often as label errors, and flagging them is
    self-confirming (never trained, they stay high). On the clean tabular task (a curved
    boundary the MLP keeps missing in places) floor 2.3 matched 0.8-1.3% of the samples, and
    excluding them cost 0.2-0.3 points of accuracy and 15% of validation loss; clean MNIST-1D
    matched 0.1%. With 20% of the labels flipped 17% matched; keeping only a tenth of the
    flipped samples in that table (~2% noise), 3%.

    Attributes:
        min_scorings: Scorings needed before a sample can be suspect.
        factor: How far above the reference its hardness and last loss must stay.
        floor: The level never goes below this.
        min_share: Share of the scored samples that must match before any is suspect.
    """

    min_scorings: int = 4
    factor: float = 4.0
    floor: float = 2.3
    min_share: float = 0.02

    def __post_init__(self) -> None:
        if not 1 <= self.min_scorings <= 2**32 - 1:
            raise ValueError(f"min_scorings must be >= 1, got {self.min_scorings}")
        if not (math.isfinite(self.factor) and self.factor > 0.0):
            raise ValueError(f"factor must be a positive number, got {self.factor}")
        if not math.isfinite(self.floor):
            raise ValueError(f"floor must be finite, got {self.floor}")
        if not 0.0 <= self.min_share <= 1.0:
            raise ValueError(f"min_share must be in [0, 1], got {self.min_share}")

    def threshold(self, reference: float) -> float:
        """The level above which a sample (scored often enough) is suspect."""
        return max(self.factor * max(reference, 0.0), self.floor)

    def mask(self, seen: np.ndarray, ema: np.ndarray, last_loss: np.ndarray,
             threshold: float, last_round: np.ndarray) -> np.ndarray:
        """Bool mask of suspects from the table's arrays (any matching shapes) and
        `threshold(reference)`."""
        t = np.float32(threshold)
        seen = np.asarray(seen)
        late = (seen > 0) & (np.asarray(last_round) >= self.min_scorings)
        evidence = (seen >= self.min_scorings) | late
        return evidence & (np.asarray(ema) > t) & (np.asarray(last_loss) > t)

    def engaged(self, match: np.ndarray, seen: np.ndarray) -> bool:
        """Whether `match` (`mask` over the whole table) holds enough of the scored samples
        for the guard to act on any of them."""
        return int(np.count_nonzero(match)) >= self.min_share * int(np.count_nonzero(seen))


def suspect_reference(ema: np.ndarray, seen: np.ndarray) -> float:
    """The run's reference hardness for `SuspectRule`: the median `ema` of scored samples."""
    values = np.asarray(ema)[np.asarray(seen) > 0]
    return float(np.median(values)) if len(values) else 0.0
