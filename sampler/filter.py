"""The batch loss filter: keep the examples that carry `min_loss_perc` of a batch's loss.

Semantics (design.md §4), for per-sample losses `l` of a batch of size B:

* sort descending and let `share = cumsum(sorted) / sum(l)`;
* `k_loss = 1 + first index where share >= min_loss_perc` (the sample that crosses the
  threshold is kept, so the kept share is >= min_loss_perc);
* `k_min = ceil(B * min_samples_perc)`; keep the top `max(k_loss, k_min, 1)`.

Edge cases, all deliberate:

* an empty batch, a 0-d tensor, negative losses or percentages outside [0, 1] raise
  `ValueError`;
* losses with more than one dimension are averaged over all but the first (batch) dimension;
* an all-zero batch keeps `max(k_min, 1)` samples and reports a loss share of 1.0;
* non-finite losses (NaN, inf) raise by default (`nonfinite="raise"`): they mean the run has
  diverged, and no share of an infinite total is meaningful. With `nonfinite="keep"` they are
  always kept (first), counted, and the share is computed over the finite losses only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

Nonfinite = Literal["raise", "keep"]


@dataclass(frozen=True)
class Selection:
    """What the filter kept from one batch.

    Attributes:
        indices: positions in the batch to keep, hardest first (int64, on the losses' device).
        samp_perc: kept fraction of the batch.
        loss_perc: fraction of the batch's (finite) loss that the kept samples carry.
        nonfinite: how many losses were NaN or inf (all kept; only with `nonfinite="keep"`).
    """

    indices: torch.Tensor
    samp_perc: float
    loss_perc: float
    nonfinite: int = 0


def _check_perc(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0):  # also false for NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def per_sample(losses: torch.Tensor) -> torch.Tensor:
    """Returns one loss per sample: multi-dimensional losses are averaged over dims > 0."""
    if losses.dim() == 0:
        raise ValueError(
            "losses is a 0-d tensor: the filter needs one loss per sample "
            "(use reduction='none')"
        )
    if losses.dim() > 1:
        losses = losses.flatten(1).mean(dim=1)
    return losses


def select(
    losses: torch.Tensor,
    min_loss_perc: float = 0.9,
    min_samples_perc: float = 0.0,
    nonfinite: Nonfinite = "raise",
) -> Selection:
    """Chooses the hardest samples of a batch that carry `min_loss_perc` of its loss.

    Args:
        losses: per-sample losses, shape (B,) or (B, ...), all >= 0.
        min_loss_perc: share of the batch loss the kept samples must reach.
        min_samples_perc: the least fraction of the batch to keep.
        nonfinite: "raise" on NaN/inf losses, or "keep" them (always kept, counted).

    Returns:
        A `Selection` whose `indices` are the kept positions, hardest first.

    Example:
        >>> sel = select(torch.tensor([0.1, 5.0, 0.2, 3.0]), min_loss_perc=0.9)
        >>> sel.indices.tolist(), round(sel.loss_perc, 3)
        ([1, 3], 0.964)
    """
    _check_perc("min_loss_perc", min_loss_perc)
    _check_perc("min_samples_perc", min_samples_perc)
    if nonfinite not in ("raise", "keep"):
        raise ValueError(f"nonfinite must be 'raise' or 'keep', got {nonfinite!r}")
    losses = per_sample(losses).detach()
    # On the CPU in float64 whatever the device: a few hundred numbers, where torch's per-op
    # dispatch costs more than the work (and the caller syncs on the result anyway).
    x = losses.to("cpu", torch.float64).numpy()
    batch = x.shape[0]
    if batch == 0:
        raise ValueError("empty batch: there is nothing to select from")

    finite = np.isfinite(x)
    n_bad = batch - int(finite.sum())
    if n_bad and nonfinite == "raise":
        raise ValueError(
            f"{n_bad} of {batch} losses are NaN or inf; the run has likely diverged "
            "(pass nonfinite='keep' to keep and count them instead)"
        )
    # Non-finite samples sort first (they are always kept); finite ones by loss, descending,
    # ties in batch order.
    scores = np.where(finite, x, math.inf)
    if bool((scores < 0).any()):
        raise ValueError("losses must be >= 0 for a loss share to mean anything")
    order = np.argsort(-scores, kind="stable")
    finite_sorted = scores[order][n_bad:]

    k_min = max(math.ceil(batch * min_samples_perc - 1e-9), 1)
    if finite_sorted.size == 0:
        k, share = max(k_min, n_bad), 1.0
    else:
        cum = np.cumsum(finite_sorted)
        total = cum[-1]
        if float(total) <= 0.0:
            k_loss, shares = 1, None
        else:
            # Dividing by cum[-1] makes the last share exactly 1.0, so a threshold of 1.0 is
            # always reached despite rounding.
            shares = cum / total
            k_loss = int(np.searchsorted(shares, min_loss_perc, side="left")) + 1
        k = min(max(n_bad + k_loss, k_min), batch)
        n_fin_kept = k - n_bad
        share = 1.0 if shares is None or n_fin_kept == 0 else float(shares[n_fin_kept - 1])
    indices = torch.from_numpy(order[:k].astype(np.int64)).to(losses.device)
    return Selection(indices=indices, samp_perc=k / batch, loss_perc=share, nonfinite=n_bad)


@dataclass
class LossShareFilter:
    """The filter with its per-step statistics, for use inside a training loop.

    Example:
        >>> f = LossShareFilter(min_loss_perc=0.9)
        >>> keep = f(torch.tensor([0.1, 5.0, 0.2, 3.0]))
        >>> keep.tolist(), f.samp_perc[-1]
        ([1, 3], 0.5)
    """

    min_loss_perc: float = 0.9
    min_samples_perc: float = 0.0
    nonfinite: Nonfinite = "raise"
    samp_perc: list[float] = field(default_factory=list)
    loss_perc: list[float] = field(default_factory=list)
    nonfinite_count: int = 0

    def __post_init__(self) -> None:
        _check_perc("min_loss_perc", self.min_loss_perc)
        _check_perc("min_samples_perc", self.min_samples_perc)

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        """Returns the indices to keep and records the step's statistics."""
        sel = select(losses, self.min_loss_perc, self.min_samples_perc, self.nonfinite)
        self.samp_perc.append(sel.samp_perc)
        self.loss_perc.append(sel.loss_perc)
        self.nonfinite_count += sel.nonfinite
        return sel.indices

    def reset(self) -> None:
        """Forgets the recorded statistics (e.g. at the start of an epoch)."""
        self.samp_perc.clear()
        self.loss_perc.clear()
        self.nonfinite_count = 0
