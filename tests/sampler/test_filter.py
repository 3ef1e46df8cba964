"""The loss-share filter: hand-computed cases and property tests of its invariants."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hardbatch.sampler.filter import LossShareFilter, select
from hypothesis import given, settings
from hypothesis import strategies as st


def kept(losses, **kw):
    return select(torch.tensor(losses, dtype=torch.float32), **kw).indices.tolist()


def test_hand_computed_cases():
    # total 8.3; 5.0 is 60%, +3.0 is 96.4% >= 90%
    assert kept([0.1, 5.0, 0.2, 3.0]) == [1, 3]
    # exactly on the threshold: 9 of 10 reaches 90%, the crossing sample is kept
    assert kept([9.0, 1.0]) == [0]
    assert kept([9.0, 1.0], min_loss_perc=0.91) == [0, 1]
    # one sample carries it all
    assert kept([0.0, 0.0, 4.0, 0.0]) == [2]
    # min_samples_perc forces more: ceil(4 * 0.6) = 3
    assert kept([0.1, 5.0, 0.2, 3.0], min_samples_perc=0.6) == [1, 3, 2]
    # min_loss_perc 0 still keeps one; 1.0 keeps every positive loss
    assert kept([1.0, 2.0, 3.0], min_loss_perc=0.0) == [2]
    assert kept([1.0, 2.0, 0.0, 3.0], min_loss_perc=1.0) == [3, 1, 0]


def test_statistics_are_reported():
    sel = select(torch.tensor([0.1, 5.0, 0.2, 3.0]))
    assert sel.samp_perc == 0.5
    assert sel.loss_perc == pytest.approx(8.0 / 8.3)
    f = LossShareFilter(min_loss_perc=0.9)
    f(torch.tensor([0.1, 5.0, 0.2, 3.0]))
    f(torch.tensor([1.0, 1.0]))
    assert f.samp_perc == [0.5, 1.0]
    assert f.loss_perc[1] == 1.0
    f.reset()
    assert f.samp_perc == [] and f.loss_perc == []


def test_all_zero_batch_keeps_k_min_or_one():
    assert len(kept([0.0] * 8)) == 1
    assert len(kept([0.0] * 8, min_samples_perc=0.5)) == 4
    assert select(torch.zeros(8)).loss_perc == 1.0


def test_multi_dimensional_losses_are_averaged_per_sample():
    losses = torch.tensor([[1.0, 1.0], [10.0, 8.0], [0.0, 0.0]])
    assert select(losses).indices.tolist() == [1]


@pytest.mark.parametrize("bad", [torch.tensor(1.0), torch.tensor([])])
def test_zero_d_and_empty_raise(bad):
    with pytest.raises(ValueError):
        select(bad)


@pytest.mark.parametrize("kw", [{"min_loss_perc": 1.5}, {"min_loss_perc": -0.1},
                                {"min_samples_perc": 2.0}, {"min_loss_perc": math.nan},
                                {"nonfinite": "ignore"}])
def test_bad_parameters_raise(kw):
    with pytest.raises(ValueError):
        select(torch.tensor([1.0, 2.0]), **kw)
    if "nonfinite" not in kw:
        with pytest.raises(ValueError):
            LossShareFilter(**kw)


def test_negative_losses_raise():
    with pytest.raises(ValueError, match=">= 0"):
        select(torch.tensor([1.0, -0.5]))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_raises_by_default_and_is_kept_and_counted_on_request(bad):
    losses = torch.tensor([0.1, bad, 5.0, 0.2])
    with pytest.raises(ValueError, match="NaN or inf"):
        select(losses)
    sel = select(losses, nonfinite="keep")
    assert sel.indices.tolist() == [1, 2]  # the bad one first, then 90% of the finite loss
    assert sel.nonfinite == 1
    assert sel.loss_perc == pytest.approx(5.0 / 5.3)
    assert select(torch.tensor([bad, bad]), nonfinite="keep").indices.tolist() == [0, 1]


def test_indices_stay_on_the_losses_device_and_dtype():
    sel = select(torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert sel.indices.dtype == torch.int64


# Losses are multiples of 1/8 so every partial sum is exact and the properties can be checked
# with exact fractions, free of rounding.
losses_st = st.lists(st.integers(0, 800), min_size=1, max_size=300)
perc_st = st.fractions(0, 1, max_denominator=100)


@settings(max_examples=300, deadline=None)
@given(losses_st, perc_st, perc_st)
def test_invariants(raw, min_loss, min_samples):
    losses = torch.tensor([v / 8 for v in raw], dtype=torch.float32)
    exact = [Fraction(v, 8) for v in raw]
    total = sum(exact)
    sel = select(losses, float(min_loss), float(min_samples))
    idx = sel.indices.tolist()
    b, k = len(raw), len(idx)
    k_min = max(math.ceil(b * min_samples), 1)

    assert len(set(idx)) == k and k >= k_min and k >= 1
    kept_share = sum(exact[i] for i in idx) / total if total else Fraction(1)
    assert kept_share >= min_loss
    # the kept set is the top-k losses (ties may pick either)
    assert sorted((exact[i] for i in idx), reverse=True) == sorted(exact, reverse=True)[:k]
    # minimal: without its smallest kept loss the share falls below the threshold, unless
    # min_samples_perc (or the floor of one) forced the extra samples
    if k > k_min and total:
        without = sum(sorted(exact, reverse=True)[: k - 1]) / total
        assert without < min_loss
    assert sel.samp_perc == k / b
    assert sel.loss_perc == pytest.approx(float(kept_share))
