"""The hardness table: semantics, duplicates within a batch, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hardbatch.sampler.hardness import (
    BYTES_PER_SAMPLE,
    HardnessTable,
    Rejections,
    SuspectRule,
    split_valid,
    suspect_reference,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def apply_one_by_one(table: HardnessTable, ids, losses, kept, steps, rounds=None) -> None:
    rounds = np.zeros(len(ids), dtype=np.int64) if rounds is None else rounds
    for i, loss, k, s, r in zip(ids, losses, kept, steps, rounds, strict=True):
        table.apply([i], [loss], [k], s, r)


def test_layout_is_20_bytes_per_sample() -> None:
    table = HardnessTable(1000)
    assert BYTES_PER_SAMPLE == 20
    assert table.nbytes == 20 * 1000
    assert {a.dtype.str for a in table.arrays().values()} == {"<f4", "<u4", "<u2"}


def test_kept_saturates_without_touching_the_round() -> None:
    table = HardnessTable(2)
    table.apply([0], [1.0], [True], 1, 7)
    table.kept[0] = 65_534
    table.apply([0, 0, 0], [1.0, 1.0, 1.0], [True, True, True], 2, 9)
    assert (table.seen[0], table.kept[0], table.last_round[0]) == (4, 65_535, 9)


def test_hardness_decays_by_rounds_not_by_observations() -> None:
    table = HardnessTable(3, ema_decay=0.5)
    table.apply([0, 1], [4.0, 4.0], [True, True], 10, 0)
    table.apply([0], [0.0], [False], 20, 1)  # one round later: half of the old value
    table.apply([1], [0.0], [False], 90, 3)  # three rounds later: an eighth
    assert table.ema[0] == 2.0 and table.ema[1] == 0.5
    assert list(table.last_round[:2]) == [1, 3]
    # Twice in one round counts as one round of progress, so repeated scorings still move it.
    table.apply([1], [0.5], [False], 91, 3)
    assert table.ema[1] == 0.5
    # A record of an older round (ranks report out of order) keeps the latest round.
    table.apply([1], [0.5], [False], 92, 2)
    assert table.last_round[1] == 3


def test_decay_is_current_after_a_dozen_rounds() -> None:
    """The issue's symptom: a sample learned in round 1 must not stay 'hard' for ever."""
    table = HardnessTable(2)
    table.apply([0], [3.0], [True], 1, 0)
    for r in range(1, 12):
        table.apply([0], [0.01], [False], 100 * r, r)
    assert table.ema[0] < 0.01 + 3.0 * 0.5 ** 11 + 1e-6
    stale = HardnessTable(2)
    stale.apply([0], [3.0], [True], 1, 0)
    stale.apply([0], [0.01], [False], 1100, 11)  # scored again only 11 rounds later
    assert stale.ema[0] < 0.012


def test_suspect_rule() -> None:
    rule = SuspectRule(min_scorings=3, factor=4.0, floor=1.0, min_share=0.0)
    seen = np.array([3, 3, 2, 5, 0, 4])
    ema = np.array([2.1, 1.9, 9.0, 0.5, 0.0, 3.0], dtype=np.float32)
    last = np.array([2.5, 3.0, 9.0, 0.5, 0.0, 0.1], dtype=np.float32)
    thr = rule.threshold(0.5)
    assert thr == 2.0
    assert rule.threshold(0.001) == 1.0  # the floor, on clean data late in training
    assert SuspectRule(floor=0.0).threshold(0.001) == pytest.approx(0.004)
    assert SuspectRule().threshold(0.001) == pytest.approx(2.3)  # the default: label < ~10%
    # High, but: below in ema / too few scorings / low / unseen / fell at the last scoring.
    rounds = np.array([2, 2, 2, 4, 0, 3])
    assert (rule.mask(seen, ema, last, thr, rounds).tolist()
            == [True, False, False, False, False, False])
    # Scored fewer times, but late in training (plans over part of the data): evidence enough.
    late = np.array([2, 2, 3, 4, 3, 3])
    assert (rule.mask(seen, ema, last, thr, late).tolist()
            == [True, False, True, False, False, False])
    h = np.array([0.5, 0.1, 0.9, 7.0, 100.0], dtype=np.float32)
    assert suspect_reference(h, seen[:5]) == pytest.approx(0.7)  # median over the four seen
    assert suspect_reference(h, np.zeros(5)) == 0.0
    with pytest.raises(ValueError):
        SuspectRule(min_scorings=0)
    with pytest.raises(ValueError):
        SuspectRule(factor=0.0)
    with pytest.raises(ValueError):
        SuspectRule(floor=float("nan"))
    with pytest.raises(ValueError):
        SuspectRule(min_share=1.5)


def test_the_guard_engages_only_when_enough_samples_match() -> None:
    n = 1000
    seen, rounds = np.full(n, 5), np.full(n, 5)
    ema = np.full(n, 0.05, dtype=np.float32)
    ema[:15] = 4.0  # 1.5% stay high: as many hard correct samples as label errors
    rule = SuspectRule(min_share=0.02)
    match = rule.mask(seen, ema, ema, 2.3, rounds)
    assert match.sum() == 15 and not rule.engaged(match, seen)
    ema[:25] = 4.0  # 2.5%: enough to act on
    assert rule.engaged(rule.mask(seen, ema, ema, 2.3, rounds), seen)
    seen[500:] = 0  # the share is of the scored samples
    ema[:12] = 0.05
    match = rule.mask(seen, ema, ema, 2.3, rounds)
    assert match.sum() == 13 and rule.engaged(match, seen)
    assert SuspectRule(min_share=0.0).engaged(np.zeros(n, bool), seen)


def test_first_record_sets_ema_then_blends() -> None:
    table = HardnessTable(4, ema_decay=0.5)
    table.apply([2], [4.0], [True], 7, 0)
    assert table.ema[2] == 4.0 and table.last_loss[2] == 4.0
    assert (table.seen[2], table.kept[2], table.last_step[2]) == (1, 1, 7)
    table.apply([2], [2.0], [False], 9, 1)
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
    st.lists(st.tuples(st.integers(0, 15), st.floats(-5, 70000, width=32), st.booleans(),
                       st.integers(0, 2**16 - 1)),
             min_size=0, max_size=60),
    st.floats(0.0, 0.99),
)
def test_batch_equals_one_by_one_property(recs, decay) -> None:
    ids = np.array([r[0] for r in recs], dtype=np.int64)
    losses = np.array([r[1] for r in recs], dtype=np.float32)
    kept = np.array([r[2] for r in recs], dtype=bool)
    rounds = np.array([r[3] for r in recs], dtype=np.int64)
    steps = np.arange(len(recs), dtype=np.uint32)
    a, b = HardnessTable(16, decay), HardnessTable(16, decay)
    a.apply(ids, losses, kept, steps, rounds)
    apply_one_by_one(b, ids, losses, kept, steps, rounds)
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


@pytest.mark.parametrize("round_", [-1, 2**16, 1.5, [1, 2]])
def test_bad_round(round_) -> None:
    table = HardnessTable(4)
    with pytest.raises(ValueError, match="round"):
        table.apply([0], [1.0], [True], 0, round_)
    assert table.applied == 0


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
