"""The sampler service: `create_app(settings)` builds the FastAPI app (run by `hardbatch serve`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pyarrow as pa
from fastapi import FastAPI
from hardbatch.services.api.deps import ServiceState, spec_security_matches_settings
from hardbatch.services.api.errors import BodySizeLimit, install_error_handlers
from hardbatch.services.api.routes import health, plans, runs, samples
from hardbatch.services.core.config import Settings
from hardbatch.services.live_runs import LiveRuns
from hardbatch.services.metrics import PlanLatency
from hardbatch.services.plan_rounds import RoundStore
from hardbatch.services.readiness import RedisProbe
from hardbatch.services.store import LossStore


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; Redis is reached (and run tables start loading) when it starts serving."""
    settings = settings or Settings()
    if settings.redis_url is None:
        raise ValueError("create_app needs settings.redis_url (hardbatch serve starts one)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # pyarrow imports pandas (where installed) on its first array from numpy: 0.2 s here
        # at startup rather than in the first plan a worker waits for.
        pa.array(np.zeros(1))
        store = LossStore.from_url(str(settings.redis_url),
                                   socket_timeout=settings.redis_timeout_s,
                                   socket_connect_timeout=min(settings.redis_timeout_s, 2.0))
        live = LiveRuns(store, settings.default_plan_config(), settings.refresh_s,
                        settings.snapshot_interval_s, idle_evict_s=settings.idle_evict_s)
        rounds = RoundStore(store.client, settings.plan_ttl_s, settings.plan_cache_rounds,
                            grace_s=settings.plan_grace_s, max_rounds=settings.plan_max_rounds,
                            wait_s=settings.round_wait_s)
        probe = RedisProbe(str(settings.redis_url), timeout_s=settings.ready_timeout_s)
        app.state.service = ServiceState(settings, store, live, rounds, PlanLatency(), probe)
        probe.start()
        live.start()
        yield
        live.stop()
        probe.stop()
        store.client.close()

    app = FastAPI(title="hardbatch sampler", version="1", lifespan=lifespan,
                  description="Per-sample hardness and hard-biased batch plans for a run.")
    install_error_handlers(app)
    for module in (health, runs, samples, plans):
        app.include_router(module.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    spec_security_matches_settings(app, settings)
    return app
