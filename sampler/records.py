"""Loss records on the wire: a batch of records is one packed little-endian byte string.

One record is 17 bytes (no padding):

| field     | type | meaning                                        |
|-----------|------|------------------------------------------------|
| sample_id | u32  | stable dataset index, 0..N-1                   |
| loss      | f32  | per-sample loss from the scoring forward       |
| step      | u32  | optimizer step of the worker that scored it    |
| epoch     | u16  | epoch                                          |
| rank      | u16  | worker rank                                    |
| kept      | u8   | 1 if the batch loss filter kept the sample     |

A packed batch is just `n * 17` bytes, so unpacking is a zero-copy `np.frombuffer`.
Pure, no I/O.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RECORD_DTYPE = np.dtype(
    [
        ("sample_id", "<u4"),
        ("loss", "<f4"),
        ("step", "<u4"),
        ("epoch", "<u2"),
        ("rank", "<u2"),
        ("kept", "u1"),
    ]
)
RECORD_SIZE = RECORD_DTYPE.itemsize  # 17

MAX_ID = 2**32 - 1
MAX_STEP = 2**32 - 1
MAX_EPOCH = 2**16 - 1
MAX_RANK = 2**16 - 1


def _to_numpy(x: Any) -> np.ndarray:
    # Torch tensors (CPU, or anything with .numpy after detach) without importing torch here.
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_scalar(name: str, value: Any, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not 0 <= int(value) <= top:
        raise ValueError(f"{name} must be in [0, {top}], got {value}")
    return int(value)


def as_columns(ids: Any, losses: Any, kept: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checks the shapes and dtypes of one batch, without a pass over the data.

    Cheap enough for a training step's hot path: only attributes are read.

    Returns:
        The three inputs as numpy arrays (not copied).

    Raises:
        ValueError: not 1-D, mismatched lengths, non-integer ids, non-numeric losses, or a
            kept mask that is not bool or integer.
    """
    ids_a, losses_a, kept_a = _to_numpy(ids), _to_numpy(losses), _to_numpy(kept)
    for name, arr in (("ids", ids_a), ("losses", losses_a), ("kept", kept_a)):
        if arr.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    n = len(ids_a)
    if len(losses_a) != n or len(kept_a) != n:
        raise ValueError(
            f"mismatched lengths: ids {n}, losses {len(losses_a)}, kept {len(kept_a)}"
        )
    if n:
        if ids_a.dtype.kind not in "iu":
            raise ValueError(f"ids must be integers, got dtype {ids_a.dtype}")
        if losses_a.dtype.kind not in "fiu":
            raise ValueError(f"losses must be numbers, got dtype {losses_a.dtype}")
        if kept_a.dtype.kind not in "biu":
            raise ValueError(f"kept must be a bool mask, got dtype {kept_a.dtype}")
    return ids_a, losses_a, kept_a


def check_scalars(step: Any, epoch: Any, rank: Any) -> tuple[int, int, int]:
    """Checks a batch's step, epoch and rank fit their record fields."""
    return (_check_scalar("step", step, MAX_STEP), _check_scalar("epoch", epoch, MAX_EPOCH),
            _check_scalar("rank", rank, MAX_RANK))


def _fill(ids: np.ndarray, losses: np.ndarray, kept: np.ndarray, step: Any, epoch: Any,
          rank: int) -> np.ndarray:
    out = np.empty(len(ids), dtype=RECORD_DTYPE)
    out["sample_id"] = ids
    out["loss"] = losses
    out["step"] = step
    out["epoch"] = epoch
    out["rank"] = rank
    out["kept"] = kept.astype(bool)
    return out


def pack(ids: Any, losses: Any, kept: Any, step: int, epoch: int, rank: int) -> np.ndarray:
    """Packs one batch of records into a structured array (a copy the caller may not touch).

    Args:
        ids: 1-D integer sample ids (numpy array, list or CPU tensor), each in [0, 2**32).
        losses: 1-D losses, same length; any finite or non-finite float (the store counts
            non-finite ones as rejections rather than failing the training step).
        kept: 1-D bool mask, same length.
        step: optimizer step, in [0, 2**32).
        epoch: epoch, in [0, 2**16).
        rank: worker rank, in [0, 2**16).

    Returns:
        A 1-D array of RECORD_DTYPE.

    Raises:
        ValueError: wrong shapes or lengths, non-integer or out-of-range ids, bad scalars.
    """
    ids_a, losses_a, kept_a = as_columns(ids, losses, kept)
    step, epoch, rank = check_scalars(step, epoch, rank)
    if len(ids_a):
        lo, hi = int(ids_a.min()), int(ids_a.max())
        if lo < 0 or hi > MAX_ID:
            bad = lo if lo < 0 else hi
            raise ValueError(f"sample ids must be in [0, {MAX_ID}], got {bad}")
    return _fill(ids_a, losses_a, kept_a, step, epoch, rank)


def pack_dropping_bad_ids(ids: np.ndarray, losses: np.ndarray, kept: np.ndarray,
                          step: np.ndarray, epoch: np.ndarray,
                          rank: int) -> tuple[np.ndarray, int]:
    """Packs columns already checked by `as_columns`, dropping ids a record cannot hold.

    For a background sender: ids outside [0, 2**32) would wrap around to other samples' ids,
    so they are left out and counted instead of raising where nobody can catch it.

    Args:
        step, epoch: one value per record.

    Returns:
        `(records, dropped)`.
    """
    ok = (ids >= 0) & (ids <= MAX_ID) if ids.dtype.itemsize > 4 or ids.dtype.kind == "i" \
        else None
    if ok is not None and not ok.all():
        dropped = int(np.count_nonzero(~ok))
        ids, losses, kept, step, epoch = ids[ok], losses[ok], kept[ok], step[ok], epoch[ok]
        return _fill(ids, losses, kept, step, epoch, rank), dropped
    return _fill(ids, losses, kept, step, epoch, rank), 0


def to_bytes(records: np.ndarray) -> bytes:
    """The wire form of a record array."""
    if records.dtype != RECORD_DTYPE:
        raise ValueError(f"expected RECORD_DTYPE records, got {records.dtype}")
    return records.tobytes()


def unpack(payload: bytes | bytearray | memoryview) -> np.ndarray:
    """Reads a packed batch back (zero-copy, read-only view on `payload`).

    Raises:
        ValueError: the length is not a whole number of records.
    """
    if len(payload) % RECORD_SIZE:
        raise ValueError(
            f"payload of {len(payload)} bytes is not a whole number of {RECORD_SIZE}-byte records"
        )
    return np.frombuffer(payload, dtype=RECORD_DTYPE)


def unpack_many(payloads: list[bytes]) -> np.ndarray:
    """Concatenates several packed batches, in order, into one record array."""
    if not payloads:
        return np.empty(0, dtype=RECORD_DTYPE)
    if len(payloads) == 1:
        return unpack(payloads[0])
    for p in payloads:
        if len(p) % RECORD_SIZE:
            raise ValueError(f"payload of {len(p)} bytes is not a whole number of records")
    return np.frombuffer(b"".join(payloads), dtype=RECORD_DTYPE)
