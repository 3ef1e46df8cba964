"""Runs: the list, one run's counters, its plan config, and deleting it."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Response
from hardbatch.services.api.deps import WRITE, State, live_run, require_read, require_write
from hardbatch.services.api.errors import StrictJSONRoute
from hardbatch.services.api.routes.common import RunName, errors
from hardbatch.services.api.schemas import PlanConfigModel, RunDetail, RunList, RunSummary
from hardbatch.services.live_runs import RunNotReadyError
from hardbatch.services.store import UnknownRunError

router = APIRouter(prefix="/v1/runs", tags=["runs"], route_class=StrictJSONRoute)


@router.get("", response_model=RunList, dependencies=[Depends(require_read)],
            responses=errors(401, 503))
def list_runs(state: State) -> RunList:
    """Every run in the store: size, ingest counters and lag, last world size and round."""
    loaded = {r.run: r for r in state.runs.loaded()}
    out = []
    for name in state.runs.names():
        r = loaded.get(name)
        ready = r is not None and r.ready
        summary = RunSummary(run=name, ready=ready,
                             num_samples=r.num_samples if r is not None and ready else None)
        if r is not None:
            summary.world_size, summary.round = r.last_world_size, r.last_round
        try:
            info = state.store.run_info(name)
        except UnknownRunError:  # deleted since it was listed
            continue
        summary.records, summary.lag_records = info.records, info.lag_records
        out.append(summary)
    return RunList(runs=out)


@router.get("/{run}", response_model=RunDetail, dependencies=[Depends(require_read)],
            responses=errors(401, 404, 503))
def get_run(run: RunName, state: State) -> RunDetail:
    """Dataset size, ingest counters and lag, table statistics, last world size and round."""
    r = live_run(state, run, ready=False)
    info = state.store.run_info(run)
    # A run registered again under this name is not ready until the refresher reloads it.
    current = r.ready and r.created_at == info.created_at
    detail = RunDetail(
        run=run, ready=current, error=r.error, num_samples=info.num_samples,
        ema_decay=info.ema_decay, created_at=info.created_at, entries=info.entries,
        records=info.records, duplicate_batches=info.duplicate_batches,
        malformed_batches=info.malformed_batches, rejected_records=info.rejected,
        lag_records=info.lag_records, world_size=r.last_world_size, round=r.last_round,
        plan_config=PlanConfigModel.from_config(r.plan_config),
    )
    if current:
        try:
            s = r.refresh_stats()
            detail.applied_records = r.version()
            if r.priorities is not None:
                detail.priorities_records = r.priorities.version
                detail.plan_share = r.priorities.share
            detail.seen_samples = s.seen_samples
            detail.kept_fraction = s.kept_fraction
            detail.ingest_rate = s.ingest_rate
            detail.hardness_quantiles = {str(q): v for q, v in s.quantiles.items()}
        except RunNotReadyError:
            pass
    return detail


@router.get("/{run}/plan-config", response_model=PlanConfigModel,
            dependencies=[Depends(require_read)], responses=errors(401, 404, 503))
def get_plan_config(run: RunName, state: State) -> PlanConfigModel:
    """The plan config of a run (the service default unless one was set)."""
    live_run(state, run, ready=False)
    return PlanConfigModel.from_config(state.runs.plan_config(run))


@router.put("/{run}/plan-config", response_model=PlanConfigModel,
            dependencies=[Depends(require_write)], openapi_extra=WRITE,
            responses=errors(400, 401, 404, 413, 422, 503))
def put_plan_config(run: RunName, body: PlanConfigModel, state: State) -> PlanConfigModel:
    """Sets the plan config of a run; rounds composed before keep theirs."""
    live_run(state, run, ready=False)
    try:
        cfg = body.to_config()
    except ValueError as e:
        raise HTTPException(status_code=422, detail=str(e)) from None
    state.runs.set_plan_config(run, cfg)
    return PlanConfigModel.from_config(cfg)


@router.delete("/{run}", status_code=204, dependencies=[Depends(require_write)],
               openapi_extra=WRITE, responses=errors(401, 404, 503))
def delete_run(run: RunName, state: State) -> Response:
    """Deletes a run and every key it has in Redis: log, snapshots, plan config, rounds.

    Every replica unloads its table within one refresh. Spill files of its reporters, on the
    training machines, are removed by `hardbatch runs --delete RUN` there.
    """
    if not state.store.has_run(run):
        raise HTTPException(status_code=404, detail=f"unknown run {run!r}")
    state.store.delete_run(run)
    state.runs.forget(run)
    return Response(status_code=204)
