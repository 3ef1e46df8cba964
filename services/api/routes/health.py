"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse
from hardbatch.services.api.deps import State, require_read
from hardbatch.services.api.errors import StrictJSONRoute
from hardbatch.services.api.schemas import ErrorBody, Health, Readiness
from hardbatch.services.metrics import render_metrics

router = APIRouter(tags=["health"], route_class=StrictJSONRoute)


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up (no dependency checked)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "Not ready yet"}})
async def readyz(state: State) -> JSONResponse:
    """Ready when Redis answers and every loaded run's table follows its log.

    Answers at once whatever Redis does: the Redis part is the last outcome of a background
    ping with a short timeout (`ready_timeout_s`), so a stalled Redis reads as a 503 with the
    reason instead of a probe that times out. A run whose table is loading, failed to load,
    or whose background reads keep failing (e.g. Redis out of memory) is listed with the
    reason, and makes the answer 503.
    """
    redis_ok, reason = state.probe.status()
    runs = {r.run: r.state for r in state.runs.loaded()}
    not_ready = {k: v for k, v in runs.items() if v != "ready"}
    if reason is None and not_ready:
        reason = "; ".join(f"run {k}: {v}" for k, v in sorted(not_ready.items()))
    ready = redis_ok and not not_ready
    body = Readiness(ready=ready, redis=redis_ok, runs=runs, reason=None if ready else reason)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(require_read)],
            responses={200: {"content": {"text/plain": {}}},
                       401: {"model": ErrorBody, "description": "Token missing or wrong"}})
def metrics(state: State) -> PlainTextResponse:
    """Prometheus metrics: ingest rate and lag, plan latency, kept fraction, hardness quantiles."""
    return PlainTextResponse(render_metrics(state.runs, state.latency),
                             media_type="text/plain; version=0.0.4")
