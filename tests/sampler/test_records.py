"""Packing loss records to bytes and back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hardbatch.sampler.records import (
    RECORD_DTYPE,
    RECORD_SIZE,
    as_columns,
    pack,
    pack_dropping_bad_ids,
    to_bytes,
    unpack,
    unpack_many,
)


def test_roundtrip_is_17_bytes_a_record() -> None:
    recs = pack(np.array([3, 0, 7]), np.array([0.5, 1.5, 2.5], np.float32),
                np.array([True, False, True]), step=11, epoch=2, rank=5)
    payload = to_bytes(recs)
    assert RECORD_SIZE == 17 and len(payload) == 3 * 17
    back = unpack(payload)
    assert back.dtype == RECORD_DTYPE
    assert list(back["sample_id"]) == [3, 0, 7]
    assert list(back["loss"]) == [0.5, 1.5, 2.5]
    assert list(back["kept"]) == [1, 0, 1]
    assert set(back["step"]) == {11} and set(back["epoch"]) == {2} and set(back["rank"]) == {5}


def test_accepts_cpu_tensors_and_lists() -> None:
    recs = pack(torch.tensor([1, 2]), torch.tensor([0.25, 0.75]), torch.tensor([True, False]),
                step=1, epoch=0, rank=0)
    assert list(recs["sample_id"]) == [1, 2] and list(recs["kept"]) == [1, 0]
    assert len(pack([4], [1.0], [1], 0, 0, 0)) == 1


def test_empty_batch() -> None:
    assert len(pack([], [], [], 0, 0, 0)) == 0
    assert len(unpack(b"")) == 0
    assert len(unpack_many([])) == 0


def test_non_finite_losses_are_carried_not_refused() -> None:
    # The store counts them as rejections; the training step must not fail on them.
    recs = pack([0, 1], [np.nan, np.inf], [1, 1], 0, 0, 0)
    assert np.isnan(recs["loss"][0]) and np.isinf(recs["loss"][1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ids": [-1]}, "sample ids"),
        ({"ids": [2**32]}, "sample ids"),
        ({"ids": [0.5]}, "integers"),
        ({"ids": [0, 1]}, "mismatched lengths"),
        ({"losses": [1.0, 2.0]}, "mismatched lengths"),
        ({"kept": [[1]]}, "1-D"),
        ({"losses": ["a"]}, "numbers"),
        ({"step": -1}, "step"),
        ({"step": 2**32}, "step"),
        ({"epoch": 2**16}, "epoch"),
        ({"rank": -2}, "rank"),
        ({"rank": 1.0}, "rank"),
        ({"step": True}, "step"),
    ],
)
def test_bad_input(kwargs, match) -> None:
    args = {"ids": [0], "losses": [1.0], "kept": [True], "step": 0, "epoch": 0, "rank": 0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pack(**args)


def test_unpack_rejects_partial_records() -> None:
    with pytest.raises(ValueError, match="whole number"):
        unpack(b"x" * 18)
    with pytest.raises(ValueError, match="whole number"):
        unpack_many([b"x" * 17, b"y" * 5])


def test_unpack_many_keeps_order() -> None:
    a = to_bytes(pack([1, 2], [1.0, 2.0], [1, 1], 0, 0, 0))
    b = to_bytes(pack([3], [3.0], [0], 1, 0, 1))
    assert list(unpack_many([a, b])["sample_id"]) == [1, 2, 3]
    with pytest.raises(ValueError):
        to_bytes(np.zeros(3, dtype=np.int32))


def test_pack_dropping_bad_ids_keeps_the_rest_in_order() -> None:
    ids = np.array([5, -1, 7, 2**32, 9])
    losses = np.arange(5, dtype=np.float32)
    recs, dropped = pack_dropping_bad_ids(ids, losses, np.ones(5, bool), np.arange(5),
                                          np.zeros(5), rank=3)
    assert dropped == 2
    assert list(recs["sample_id"]) == [5, 7, 9] and list(recs["loss"]) == [0, 2, 4]
    assert list(recs["step"]) == [0, 2, 4] and set(recs["rank"]) == {3}
    ok, none = pack_dropping_bad_ids(np.array([1], np.uint32), np.ones(1, np.float32),
                                     np.ones(1, bool), np.zeros(1), np.zeros(1), rank=0)
    assert none == 0 and len(ok) == 1


def test_as_columns_reads_no_data() -> None:
    ids, losses, kept = as_columns(np.arange(3), np.ones(3), np.ones(3, bool))
    assert ids.dtype.kind == "i" and len(losses) == 3
    with pytest.raises(ValueError, match="mismatched"):
        as_columns(np.arange(3), np.ones(2), np.ones(3, bool))
