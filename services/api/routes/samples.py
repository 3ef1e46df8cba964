"""Per-sample hardness: one id, many ids, the hardest or easiest k, the distribution."""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Path, Query
from hardbatch.sampler.hardness import HardnessTable, SuspectRule
from hardbatch.services.api.deps import ServiceState, State, live_run, require_read
from hardbatch.services.api.errors import StrictJSONRoute
from hardbatch.services.api.routes.common import RunName, errors
from hardbatch.services.api.schemas import (
    HardnessField,
    Histogram,
    LookupRequest,
    LookupResponse,
    Sample,
    SampleList,
    SuspectList,
)

router = APIRouter(prefix="/v1/runs", tags=["samples"], dependencies=[Depends(require_read)],
                   route_class=StrictJSONRoute)


def _sample(table: HardnessTable, i: int, guard: tuple[SuspectRule, float] | None) -> Sample:
    seen = int(table.seen[i])
    if seen == 0:
        return Sample(id=i, seen=0, kept=int(table.kept[i]))
    suspect = guard is not None and bool(
        guard[0].mask(table.seen[i], table.ema[i], table.last_loss[i], guard[1],
                      table.last_round[i]))
    return Sample(id=i, seen=seen, kept=int(table.kept[i]), last_loss=float(table.last_loss[i]),
                  ema=float(table.ema[i]), last_step=int(table.last_step[i]),
                  last_round=int(table.last_round[i]), suspect=suspect)


@router.get("/{run}/samples/{sample_id:sample_id}", response_model=Sample,
            responses=errors(401, 404, 422, 503))
def get_sample(
    run: RunName, sample_id: Annotated[int, Path(ge=0, description="Sample id in [0, N).")],
    state: State,
) -> Sample:
    """One sample's hardness record."""
    r = live_run(state, run)
    m = r.mat()
    with m.view() as table:
        if sample_id >= table.size:
            raise HTTPException(
                status_code=404,
                detail=f"sample {sample_id} is not in run {run!r} (ids 0..{table.size - 1})",
            )
        return _sample(table, sample_id, r.suspect_rule())


@router.get("/{run}/samples", response_model=SampleList, responses=errors(401, 404, 422, 503))
def top_samples(
    run: RunName,
    state: State,
    order: Annotated[Literal["hardest", "easiest"], Query()] = "hardest",
    limit: Annotated[int, Query(ge=1, description="How many (at most max_limit).")] = 20,
    by: Annotated[HardnessField, Query(description="Field to rank by.")] = "ema",
) -> SampleList:
    """The hardest (or easiest) `limit` samples among those scored at least once."""
    _check_limit(state, limit)
    r = live_run(state, run, wait_s=2.0)
    m = r.mat()
    guard = r.suspect_rule()
    with m.view() as table:
        seen_ids = np.flatnonzero(table.seen)
        values = getattr(table, by)[seen_ids]
        k = min(limit, len(seen_ids))
        if k == 0:
            ids = np.empty(0, dtype=np.int64)
        else:
            key = -values if order == "hardest" else values
            top = np.argpartition(key, k - 1)[:k]
            ids = seen_ids[top[np.argsort(key[top], kind="stable")]]
        samples = [_sample(table, int(i), guard) for i in ids]
    return SampleList(run=run, order=order, by=by, samples=samples)


@router.get("/{run}/suspects", response_model=SuspectList,
            responses=errors(401, 404, 422, 503))
def suspects(
    run: RunName,
    state: State,
    limit: Annotated[int, Query(ge=1, description="How many (at most max_limit).")] = 20,
) -> SuspectList:
    """Suspected label errors: samples scored at least `min_scorings` times (or last scored in
    round `min_scorings` or later) whose current
    hardness and last loss stay above the run's threshold (a multiple of its median hardness),
    hardest first.

    The threshold is the one the plans used at their last rebuild (every `refresh_s`); plans
    give these samples weight 0, so the workers score them but do not train on them.
    """
    _check_limit(state, limit)
    r = live_run(state, run, wait_s=2.0)
    m = r.mat()
    guard = r.suspect_rule()
    if guard is None:
        return SuspectList(run=run, total=0, samples=[])
    rule, threshold = guard
    with m.view() as table:
        flagged = np.flatnonzero(rule.mask(table.seen, table.ema, table.last_loss, threshold,
                                           table.last_round))
        key = -table.ema[flagged]
        k = min(limit, len(flagged))
        top = np.argpartition(key, k - 1)[:k] if k else np.empty(0, dtype=np.int64)
        ids = flagged[top[np.argsort(key[top], kind="stable")]]
        samples = [_sample(table, int(i), guard) for i in ids]
    return SuspectList(run=run, total=int(len(flagged)), threshold=threshold,
                       min_scorings=rule.min_scorings, samples=samples)


@router.post("/{run}/samples/lookup", response_model=LookupResponse,
             responses=errors(400, 401, 404, 413, 422, 503))
def lookup_samples(run: RunName, body: LookupRequest, state: State) -> LookupResponse:
    """Records of many samples at once (a read: it changes nothing)."""
    cap = state.settings.max_lookup_ids
    if len(body.ids) > cap:
        raise HTTPException(status_code=422,
                            detail=f"at most {cap} ids per lookup, got {len(body.ids)}")
    m = live_run(state, run, wait_s=2.0).mat()
    n = m.table.size
    bad = [i for i in body.ids if not 0 <= i < n]
    if bad:
        raise HTTPException(
            status_code=422,
            detail=f"{len(bad)} id(s) outside [0, {n}) for run {run!r}, first {bad[0]}",
        )
    ids = np.asarray(body.ids, dtype=np.int64)
    with m.view() as table:
        seen = table.seen[ids]
        kept = table.kept[ids]
        last = table.last_loss[ids]
        ema = table.ema[ids]
        step = table.last_step[ids]
    unseen = seen == 0

    def nullable(a: np.ndarray) -> list:
        out = a.tolist()
        for j in np.flatnonzero(unseen).tolist():
            out[j] = None
        return out

    return LookupResponse(
        run=run, ids=ids.tolist(), seen=seen.tolist(), kept=kept.tolist(),
        last_loss=nullable(last), ema=nullable(ema), last_step=nullable(step),
    )


@router.get("/{run}/histogram", response_model=Histogram, responses=errors(401, 404, 422, 503))
def histogram(
    run: RunName,
    state: State,
    bins: Annotated[int, Query(ge=1, description="Number of bins (at most max_bins).")] = 20,
    field: Annotated[HardnessField, Query(description="Field to histogram.")] = "ema",
) -> Histogram:
    """The distribution of hardness over samples scored at least once."""
    cap = state.settings.max_bins
    if bins > cap:
        raise HTTPException(status_code=422, detail=f"bins must be <= {cap}, got {bins}")
    m = live_run(state, run, wait_s=2.0).mat()
    with m.view() as table:
        mask = table.seen > 0
        values = getattr(table, field)[mask]
    if len(values):
        lo, hi = float(values.min()), float(values.max())
        counts, edges = np.histogram(values, bins=bins, range=(lo, hi if hi > lo else lo + 1.0))
    else:
        counts, edges = np.zeros(bins, dtype=np.int64), np.linspace(0.0, 1.0, bins + 1)
    return Histogram(run=run, field=field, edges=edges.tolist(), counts=counts.tolist(),
                     seen=int(len(values)), unseen=int(len(mask) - len(values)))


def _check_limit(state: ServiceState, limit: int) -> None:
    """A listing asks for at most the service's `max_limit` samples (422 otherwise)."""
    cap = state.settings.max_limit
    if limit > cap:
        raise HTTPException(status_code=422, detail=f"limit must be <= {cap}, got {limit}")
