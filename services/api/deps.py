"""Request dependencies: the service state, and bearer-token checks."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from hardbatch.services.core.config import Settings
from hardbatch.services.live_runs import LiveRun, LiveRuns, RunNotReadyError
from hardbatch.services.metrics import PlanLatency
from hardbatch.services.plan_rounds import RoundStore
from hardbatch.services.readiness import RedisProbe
from hardbatch.services.store import LossStore, StoreError, UnknownRunError


@dataclass
class ServiceState:
    """Everything the routes share, built once by `create_app`'s lifespan."""

    settings: Settings
    store: LossStore
    runs: LiveRuns
    rounds: RoundStore
    latency: PlanLatency
    probe: RedisProbe


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


State = Annotated[ServiceState, Depends(get_state)]

#: `openapi_extra` of routes that change state (they always need the token when one is set).
WRITE: dict[str, Any] = {"x-access": "write"}

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <HARDBATCH_API_TOKEN>`")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _check(state: ServiceState, creds: HTTPAuthorizationCredentials | None) -> None:
    token = state.settings.token()
    if token is None:
        return
    given = creds.credentials if creds is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong bearer token (send Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_write(state: State, creds: Credentials) -> None:
    """State-changing endpoints: need the token whenever one is configured."""
    _check(state, creds)


def require_read(state: State, creds: Credentials) -> None:
    """Read endpoints: need the token only when `auth_reads` is on."""
    if state.settings.auth_reads:
        _check(state, creds)


def live_run(state: ServiceState, run: str, *, ready: bool = True, wait_s: float = 0.0) -> LiveRun:
    """The run named in the path: 404 if unknown, 503 while its table loads.

    Args:
        wait_s: how long to wait for a loading table (0 in async routes, which must not block).
    """
    try:
        r = state.runs.get(run)
    except UnknownRunError as e:
        raise HTTPException(status_code=404, detail=str(e)) from None
    except StoreError as e:
        raise HTTPException(status_code=404, detail=str(e)) from None
    if ready and not r.ready and not (wait_s > 0 and r.wait_ready(wait_s)):
        try:
            r.mat()
        except RunNotReadyError as e:
            raise HTTPException(status_code=503, detail=str(e),
                                headers={"Retry-After": "1"}) from None
    return r


def spec_security_matches_settings(app: FastAPI, settings: Settings) -> None:
    """Makes the OpenAPI spec declare the bearer token only where this server checks it.

    Read and write routes both depend on the bearer scheme, so FastAPI lists it on all of them;
    but reads are open unless `auth_reads`, and everything is open without a token. Clients and
    API fuzzers go by the spec. Write routes carry `WRITE` in their `openapi_extra`.
    """
    token = settings.token() is not None
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = default_openapi()
            for ops in spec.get("paths", {}).values():
                for op in ops.values():
                    write = op.get("x-access") == "write"
                    if not token or not (write or settings.auth_reads):
                        op.pop("security", None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
