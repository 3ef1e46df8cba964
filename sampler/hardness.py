"""The per-sample hardness table: dense arrays indexed by sample id, updated from loss records.

Each sample costs exactly 20 bytes: last loss (f32), exponential moving average of the loss
(f32), times scored (u32), times kept by the filter (u32) and the training step of the last
record (u32). No dict or object per sample, so 100M samples take 2 GB. The field arrays are
numpy views (last_loss/ema and seen/kept are interleaved pairs in memory, so an update touches
fewer cache lines); copy one with `.copy()` for a contiguous array.

`HardnessTable.apply` is vectorized. A batch may name the same id more than once (a coalesced
report spanning several epochs of a small dataset); the result is then exactly, bit for bit,
what applying the records one at a time in order would give: duplicates are applied in rounds,
the k-th occurrence of every id in round k, each round with unique ids.

Pure numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from hardbatch.sampler.records import as_columns

FIELDS: tuple[str, ...] = ("last_loss", "ema", "seen", "kept", "last_step")
FIELD_DTYPES: dict[str, np.dtype[Any]] = {
    "last_loss": np.dtype("<f4"),
    "ema": np.dtype("<f4"),
    "seen": np.dtype("<u4"),
    "kept": np.dtype("<u4"),
    "last_step": np.dtype("<u4"),
}
BYTES_PER_SAMPLE = sum(d.itemsize for d in FIELD_DTYPES.values())  # 20

# +1 to seen, and +1 to kept, as additions to a (seen, kept) pair viewed as one uint64.
_SEEN_ONE = np.array([1, 0], dtype=np.uint32).view(np.uint64)[0]
_KEPT_ONE = np.array([0, 1], dtype=np.uint32).view(np.uint64)[0]

# Ids are stored as u32 on the wire and steps as u32 in the table.
MAX_SAMPLES = 2**32 - 1
MAX_STEP = 2**32 - 1


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
        ema_decay: weight of the old value in the moving average; the first record of a sample
            sets the average to its loss.
        last_loss, ema, seen, kept, last_step: the arrays, indexed by sample id.
        applied: records applied so far.
    """

    def __init__(self, size: int, ema_decay: float = 0.9) -> None:
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
            raise ValueError(f"size must be an int, got {size!r}")
        if not 0 < size <= MAX_SAMPLES:
            raise ValueError(f"size must be in [1, {MAX_SAMPLES}], got {size}")
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.size = int(size)
        self.ema_decay = float(ema_decay)
        self._decay = np.float32(ema_decay)
        self._gain = np.float32(1.0 - np.float32(ema_decay))
        # Fields updated together live side by side, so an update gathers and scatters one
        # 8-byte word per pair instead of two 4-byte ones: half the random memory accesses.
        self._losses = np.zeros((self.size, 2), dtype=np.float32)  # last_loss, ema
        self._counts = np.zeros((self.size, 2), dtype=np.uint32)  # seen, kept
        self._losses64 = self._losses.view(np.uint64).reshape(self.size)
        self._counts64 = self._counts.view(np.uint64).reshape(self.size)
        self.last_loss: np.ndarray = self._losses[:, 0]
        self.ema: np.ndarray = self._losses[:, 1]
        self.seen: np.ndarray = self._counts[:, 0]
        self.kept: np.ndarray = self._counts[:, 1]
        self.last_step = np.zeros(self.size, dtype=FIELD_DTYPES["last_step"])
        self.applied = 0

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in FIELDS)

    def arrays(self) -> dict[str, np.ndarray]:
        """The five arrays by field name (views, not copies)."""
        return {f: getattr(self, f) for f in FIELDS}

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], ema_decay: float = 0.9, applied: int = 0
    ) -> HardnessTable:
        """Builds a table from the five arrays (copied), checking dtypes and lengths."""
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

    def apply(self, ids: Any, losses: Any, kept: Any, step: Any) -> None:
        """Applies a batch of loss records, in order.

        Args:
            ids: sample ids, each in [0, size).
            losses: finite losses, one per id.
            kept: whether the filter kept each sample.
            step: training step, one for the batch or one per record.

        Raises:
            ValueError: bad shapes, an id out of range or a non-finite loss. The table is left
                untouched: everything is checked before anything is written.
        """
        ids_a, losses_a, kept_a, step_a = as_batch(ids, losses, kept, step)
        check_valid(ids_a, losses_a, self.size)
        self._apply_valid(ids_a, losses_a, kept_a, step_a)

    def apply_records(self, ids: np.ndarray, losses: np.ndarray, kept: np.ndarray,
                      step: np.ndarray) -> None:
        """`apply` for arrays already checked by `as_batch` and `split_valid` (the hot path)."""
        self._apply_valid(ids, losses, kept, step)

    def _apply_valid(self, ids: np.ndarray, losses: np.ndarray, kept: np.ndarray,
                     step: np.ndarray) -> None:
        rounds = occurrence_rounds(ids)
        if rounds is None:
            self._apply_unique(ids, losses, kept, step)
        else:
            for idx in rounds:
                self._apply_unique(ids[idx], losses[idx], kept[idx], step[idx])
        self.applied += len(ids)

    def _apply_unique(self, ids: np.ndarray, losses: np.ndarray, kept: np.ndarray,
                      step: np.ndarray) -> None:
        m = len(ids)
        old = self._losses64[ids].view(np.float32).reshape(m, 2)
        counts = self._counts64[ids]
        # kept <= seen, so both counters are zero exactly when the sample was never seen.
        first = counts == 0
        new = np.empty((m, 2), dtype=np.float32)
        new[:, 0] = losses
        # f32 throughout, so a vectorized round equals applying records one at a time.
        new[:, 1] = np.where(first, losses, old[:, 1] * self._decay + losses * self._gain)
        self._losses64[ids] = new.view(np.uint64).reshape(m)
        # One 64-bit add bumps both counters (neither nears 2**32, so nothing carries).
        counts += _SEEN_ONE
        counts += kept.astype(np.uint64) * _KEPT_ONE
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
