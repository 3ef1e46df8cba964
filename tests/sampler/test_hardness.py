"""The hardness table: semantics, duplicates within a batch, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hardbatch.sampler.hardness import BYTES_PER_SAMPLE, HardnessTable, Rejections, split_valid
from hypothesis import given, settings
from hypothesis import strategies as st


def apply_one_by_one(table: HardnessTable, ids, losses, kept, steps) -> None:
    for i, loss, k, s in zip(ids, losses, kept, steps, strict=True):
        table.apply([i], [loss], [k], s)


def test_layout_is_20_bytes_per_sample() -> None:
    table = HardnessTable(1000)
    assert BYTES_PER_SAMPLE == 20
    assert table.nbytes == 20 * 1000
    assert {a.dtype.str for a in table.arrays().values()} == {"<f4", "<u4"}


def test_first_record_sets_ema_then_blends() -> None:
    table = HardnessTable(4, ema_decay=0.5)
    table.apply([2], [4.0], [True], 7)
    assert table.ema[2] == 4.0 and table.last_loss[2] == 4.0
    assert (table.seen[2], table.kept[2], table.last_step[2]) == (1, 1, 7)
    table.apply([2], [2.0], [False], 9)
    assert table.ema[2] == 3.0 and table.last_loss[2] == 2.0
    assert (table.seen[2], table.kept[2], table.last_step[2]) == (2, 1, 9)
    assert table.seen.sum() == 2 and table.applied == 2


def test_per_record_steps() -> None:
    table = HardnessTable(3)
    table.apply([0, 1], [1.0, 2.0], [True, True], np.array([5, 6]))
    assert list(table.last_step[:2]) == [5, 6]


def test_duplicates_in_batch_match_sequential() -> None:
    ids = np.array([3, 1, 3, 3, 0, 1])
    losses = np.array([1.0, 2.0, 3.0, 4.5, 0.1, 0.7], dtype=np.float32)
    kept = np.array([1, 0, 1, 0, 1, 1], dtype=bool)
    steps = np.arange(6, dtype=np.uint32) + 10
    batched, seq = HardnessTable(5), HardnessTable(5)
    batched.apply(ids, losses, kept, steps)
    apply_one_by_one(seq, ids, losses, kept, steps)
    assert batched.equals(seq)
    assert batched.seen[3] == 3 and batched.last_loss[3] == np.float32(4.5)
    assert batched.last_step[3] == 13


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 15), st.floats(0, 50, width=32), st.booleans()),
             min_size=0, max_size=60),
    st.floats(0.0, 0.99),
)
def test_batch_equals_one_by_one_property(recs, decay) -> None:
    ids = np.array([r[0] for r in recs], dtype=np.int64)
    losses = np.array([r[1] for r in recs], dtype=np.float32)
    kept = np.array([r[2] for r in recs], dtype=bool)
    steps = np.arange(len(recs), dtype=np.uint32)
    a, b = HardnessTable(16, decay), HardnessTable(16, decay)
    a.apply(ids, losses, kept, steps)
    apply_one_by_one(b, ids, losses, kept, steps)
    assert a.equals(b)


@pytest.mark.parametrize(
    "ids, losses, kept, match",
    [
        ([0, 1], [1.0, float("nan")], [1, 1], "non-finite"),
        ([0, 1], [1.0, float("inf")], [1, 1], "non-finite"),
        ([0, -1], [1.0, 1.0], [1, 1], "outside"),
        ([0, 10], [1.0, 1.0], [1, 1], "outside"),
        ([0, 1], [1.0], [1, 1], "mismatched lengths"),
        ([0, 1], [1.0, 2.0], [1], "mismatched lengths"),
        ([[0, 1]], [[1.0, 2.0]], [[1, 1]], "1-D"),
        ([0.5, 1.0], [1.0, 2.0], [1, 1], "integers"),
    ],
)
def test_bad_input_raises_and_leaves_table_untouched(ids, losses, kept, match) -> None:
    table = HardnessTable(10)
    table.apply([3], [1.0], [True], 1)
    before = table.copy()
    with pytest.raises(ValueError, match=match):
        table.apply(ids, losses, kept, 2)
    assert table.equals(before) and table.applied == 1


@pytest.mark.parametrize("step", [-1, 2**32, 1.5])
def test_bad_step(step) -> None:
    with pytest.raises(ValueError, match="step"):
        HardnessTable(4).apply([0], [1.0], [True], step)


@pytest.mark.parametrize("size, decay", [(0, 0.9), (-3, 0.9), (2**32, 0.9), (10, 1.0),
                                         (10, -0.1), (2.5, 0.9)])
def test_bad_construction(size, decay) -> None:
    with pytest.raises(ValueError):
        HardnessTable(size, decay)


def test_split_valid_counts_each_record_once() -> None:
    ids = np.array([0, 5, -1, 2, 99])
    losses = np.array([1.0, np.nan, np.nan, np.inf, 1.0], dtype=np.float32)
    mask, rej = split_valid(ids, losses, 10)
    assert mask is not None and list(mask) == [True, False, False, False, False]
    assert rej == Rejections(out_of_range=2, nonfinite=2) and rej.total == 4
    assert split_valid(ids[:1], losses[:1], 10) == (None, Rejections())


def test_hardest_ranks_seen_samples() -> None:
    table = HardnessTable(6, ema_decay=0.0)
    table.apply([0, 1, 2, 3], [0.5, 3.0, 2.0, 0.1], [1, 1, 1, 1], 1)
    assert list(table.hardest(2)) == [1, 2]
    assert list(table.hardest(10)) == [1, 2, 0, 3]
    assert list(table.hardest(0)) == []
    with pytest.raises(ValueError):
        table.hardest(1, by="seen")


def test_from_arrays_roundtrip_and_checks() -> None:
    table = HardnessTable(5)
    table.apply([1, 4], [1.0, 2.0], [1, 0], 3)
    copy = HardnessTable.from_arrays(table.arrays(), 0.9, applied=2)
    assert copy.equals(table) and copy.applied == 2
    bad = table.arrays() | {"ema": np.zeros(4, np.float32)}
    with pytest.raises(ValueError, match="shape"):
        HardnessTable.from_arrays(bad)
    with pytest.raises(ValueError, match="missing"):
        HardnessTable.from_arrays({"ema": table.ema})
