"""Plans: the ids a rank trains on in a round, as JSON or as an Arrow IPC stream."""

from __future__ import annotations

import json
import time
from typing import Annotated

import numpy as np
import pyarrow as pa
from fastapi import APIRouter, Depends, Header, HTTPException, Response
from hardbatch.services.api.deps import WRITE, State, live_run, require_write
from hardbatch.services.api.errors import StrictJSONRoute
from hardbatch.services.api.routes.common import RunName, errors
from hardbatch.services.api.schemas import Plan, PlanRequest
from hardbatch.services.plan_rounds import RoundConflictError

router = APIRouter(prefix="/v1/runs", tags=["plans"], route_class=StrictJSONRoute)

ARROW_STREAM = "application/vnd.apache.arrow.stream"


def _check_bounds(body: PlanRequest, state: State) -> None:
    s = state.settings
    problems = []
    if body.rank >= body.world_size:
        problems.append(f"rank must be in [0, world_size={body.world_size}), got {body.rank}")
    if body.world_size > s.max_world_size:
        problems.append(f"world_size must be <= {s.max_world_size}, got {body.world_size}")
    if body.batches > s.max_batches:
        problems.append(f"batches must be <= {s.max_batches}, got {body.batches}")
    if body.batch_size > s.max_batch_size:
        problems.append(f"batch_size must be <= {s.max_batch_size}, got {body.batch_size}")
    if not problems and body.world_size * body.batches * body.batch_size > s.max_round_ids:
        problems.append(f"a round may hold at most {s.max_round_ids} ids, this one "
                        f"{body.world_size * body.batches * body.batch_size}")
    if problems:
        raise HTTPException(status_code=422, detail="; ".join(problems))


def _arrow(run: str, body: PlanRequest, uniform: bool, ids: np.ndarray,
           weights: np.ndarray | None, losses: np.ndarray | None,
           unseen: np.ndarray | None) -> bytes:
    cols = {
        "batch": pa.array(np.repeat(np.arange(len(ids), dtype=np.int32), body.batch_size)),
        "id": pa.array(ids.ravel()),
    }
    if weights is not None:
        cols["weight"] = pa.array(weights.ravel())
    if losses is not None:
        cols["loss"] = pa.array(losses.ravel(), mask=None if unseen is None else unseen.ravel())
    meta = {"run": run, "round": str(body.round), "rank": str(body.rank),
            "world_size": str(body.world_size), "batches": str(len(ids)),
            "batch_size": str(body.batch_size), "uniform": str(uniform).lower()}
    table = pa.table(cols).replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


@router.post(
    "/{run}/plans",
    response_model=Plan,
    dependencies=[Depends(require_write)],
    openapi_extra=WRITE,
    responses={
        200: {"content": {ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}}},
              "description": f"The plan, as JSON or (Accept: {ARROW_STREAM}) an Arrow IPC "
                             "stream with columns batch, id, and weight/loss when asked."},
        **errors(400, 401, 404, 409, 413, 422, 503),
    },
)
def compose_plan(
    run: RunName,
    body: PlanRequest,
    state: State,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """This rank's batches of the round; the round is composed once for every rank.

    Ranks of one round get disjoint ids and the same number of batches. The same (run, round,
    world_size) always gives the same round, also after a service restart (rounds are kept in
    Redis for `plan_ttl_s`).
    """
    t0 = time.perf_counter()
    _check_bounds(body, state)
    r = live_run(state, run, wait_s=2.0)
    try:
        plan, _ = state.rounds.get(r, round_=body.round, world_size=body.world_size,
                                   batches=body.batches, batch_size=body.batch_size,
                                   rank=body.rank, after_losses=body.after_losses)
    except RoundConflictError as e:
        state.latency.error(run, 409)
        raise HTTPException(status_code=409, detail=str(e)) from None
    except ValueError as e:
        state.latency.error(run, 422)
        raise HTTPException(status_code=422, detail=str(e)) from None
    r.last_world_size, r.last_round = body.world_size, body.round
    ids, weights = plan.for_rank(body.rank)
    losses = unseen = None
    if body.with_losses:
        m = r.mat()
        with m.view() as table:
            losses = table.last_loss[ids]
            unseen = table.seen[ids] == 0
    wants_arrow = accept is not None and ARROW_STREAM in accept
    if wants_arrow:
        payload = _arrow(run, body, plan.uniform, ids, weights if body.with_weights else None,
                         losses, unseen)
        resp = Response(payload, media_type=ARROW_STREAM)
    else:
        out = {
            "run": run, "round": body.round, "rank": body.rank, "world_size": body.world_size,
            "batches": plan.batches, "batch_size": body.batch_size, "uniform": plan.uniform,
            "ids": ids.tolist(), "weights": weights.tolist() if body.with_weights else None,
            "losses": None,
        }
        if losses is not None and unseen is not None:
            rows = losses.tolist()
            for b, j in zip(*np.nonzero(unseen), strict=False):
                rows[b][j] = None
            out["losses"] = rows
        # Written directly: validating 16k-id plans through pydantic would double the latency.
        resp = Response(json.dumps(out, separators=(",", ":")), media_type="application/json")
    state.latency.observe(run, time.perf_counter() - t0)
    return resp
