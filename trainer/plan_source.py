"""Where a worker's batches come from: the sampler service, or a local shuffle when it is away.

A round is one epoch: the service composes it for all ranks at once (hard-biased, disjoint).
This rank asks for round e+1 once it has trained round e (its worker has sent round e's last
losses without lingering): the service composes round e+1 from all of round e's losses, so
the plans of one seed are the same in every run. The price is one request per round at the
round's start (measured: README, "Reproducible service plans"). When the service cannot be
reached (no answer, or a 5xx), the rank falls back to a seeded shuffle of its own shard for
that round and asks the service again for the next one. A 4xx is a mistake (token, run, round
shape), not an outage: it raises.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
from hardbatch.services.client import SamplerClient, SamplerError

log = logging.getLogger(__name__)


def batches_per_round(num_samples: int, world_size: int, batch_size: int,
                      fraction: float = 1.0) -> int:
    """Batches each rank trains per round: the same on every rank (or DDP would hang)."""
    return max(1, math.floor(fraction * num_samples / (world_size * batch_size)))


def shard_plan(num_samples: int, batch_size: int, batches: int, rank: int, world_size: int,
               seed: int, epoch: int) -> list[torch.Tensor]:
    """A seeded shuffle cut into `batches` full batches per rank; ranks get disjoint ids."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_samples, generator=gen)
    per_rank = batches * batch_size
    if per_rank * world_size > num_samples:
        # A round asks for more than the data: repeat the shuffle rather than short a rank.
        perm = perm.repeat(math.ceil(per_rank * world_size / num_samples))
    mine = perm[rank * per_rank:(rank + 1) * per_rank]
    return list(mine.split(batch_size))


class RoundPlans:
    """`(epoch, num_samples) -> batches` for one rank, from the service with local fallback.

    Args:
        client: the sampler service, or None to always shuffle locally.
        run: run name at the service.
        rank: this rank.
        world_size: number of ranks.
        batch_size: samples per batch.
        fraction: share of the dataset each round covers across all ranks.
        seed: seed of the fallback shuffle.
        with_weights: ask the service for importance weights too (a round's `weights`; a
            local round has none: uniform, so no correction is due).
        after_losses: this rank streams its losses: the service composes each round from all
            of the previous round's.
    """

    def __init__(self, client: SamplerClient | None, run: str, rank: int, world_size: int,
                 batch_size: int, fraction: float, seed: int,
                 with_weights: bool = False, after_losses: bool = False) -> None:
        self.client, self.run = client, run
        self.with_weights, self.after_losses = with_weights, after_losses
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.fraction, self.seed = batch_size, fraction, seed
        self.service_rounds = 0
        self.fallback_rounds = 0

    def steps(self, num_samples: int) -> int:
        return batches_per_round(num_samples, self.world_size, self.batch_size, self.fraction)

    def __call__(self, epoch: int, num_samples: int) -> Round:
        if self.client is None:
            return Round(self._local(epoch, num_samples))
        try:
            plan = self.client.plan(
                self.run, rank=self.rank, world_size=self.world_size, round=epoch,
                batches=self.steps(num_samples), batch_size=self.batch_size,
                with_weights=self.with_weights, after_losses=self.after_losses)
        except SamplerError as e:
            if not _outage(e):
                raise
            self.fallback_rounds += 1
            log.warning("rank %d round %d: %s; training on a local shuffle this round",
                        self.rank, epoch, e)
            batches, weights = self._local(epoch, num_samples), None
        else:
            self.service_rounds += 1
            batches = list(torch.from_numpy(plan.ids))
            weights = None if plan.weights is None else list(torch.tensor(plan.weights))
        return Round(batches, weights)

    def _local(self, epoch: int, num_samples: int) -> list[torch.Tensor]:
        return shard_plan(num_samples, self.batch_size, self.steps(num_samples), self.rank,
                          self.world_size, self.seed, epoch)


def _outage(e: SamplerError) -> bool:
    """No answer or a server error: worth a local shuffle. A 4xx is the caller's mistake."""
    return e.status is None or e.status >= 500


class Round(list[torch.Tensor]):
    """A round's batches of ids (and their importance weights, when the plan has them).

    Iterating yields each batch with the slots the plan does not train (weight `SKIP`, an
    adaptive plan size) as id -1, which `IdDataset` drops unloaded: a packed round's last
    batch is short; an unpacked one keeps an epoch's batches and each shrinks to what the plan
    trains.
    """

    def __init__(self, batches: list[torch.Tensor],
                 weights: list[torch.Tensor] | None = None) -> None:
        super().__init__(batches)
        # Weights all 1 (plans over all the data, no suspects) change nothing: none to apply.
        ones = weights is not None and all(bool((w == 1).all()) for w in weights)
        self.weights = None if ones else weights
        # Slots the plan does not train (an adaptive size): yielded as id -1.
        self._skips = (None if self.weights is None or not any(bool((w < 0).any())
                                                                for w in self.weights)
                       else [w < 0 for w in self.weights])
        self._index: torch.Tensor | None = None  # weight by id, NaN where not planned

    def truncated(self, batches: int) -> Round:
        """The first `batches` batches (the ranks of a round must train as many: a rank on
        its local fallback gets full rounds where the service's are packed)."""
        if batches >= len(self):
            return self
        head = list(super().__iter__())[:batches]
        return Round(head, None if self.weights is None else self.weights[:batches])

    def weights_of(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The importance weights of `ids` (ids this round trains), or None if it has none."""
        if self.weights is None:
            return None
        if self._index is None:  # once per round: a lookup is then one gather
            all_ids, weights = torch.cat(list(super().__iter__())), torch.cat(self.weights)
            self._index = torch.full((int(all_ids.max()) + 1,), math.nan)
            self._index[all_ids] = torch.where(weights < 0, math.nan, weights.float())
        ids = ids.cpu()
        if len(ids) and not (int(ids.min()) >= 0 and int(ids.max()) < len(self._index)):
            raise ValueError("these ids are not in the current round's plan")
        w = self._index[ids]
        if bool(w.isnan().any()):
            raise ValueError("these ids are not in the current round's plan")
        return w

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i, batch in enumerate(super().__iter__()):
            if self._skips is not None:
                batch = torch.where(self._skips[i], -1, batch)
            yield batch
