"""Errors as clear 4xx/503 answers, and the request body size limit."""

from __future__ import annotations

import re
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from hardbatch.services.live_runs import RunNotReadyError
from hardbatch.services.store import StoreError, UnknownRunError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def install_error_handlers(app: FastAPI) -> None:
    """Maps the service's known failures to status codes (none of them is a 500)."""

    async def unknown_run(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=404)

    async def bad_input(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=422)

    async def unavailable(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"{type(e).__name__}: {e}"}, status_code=503,
                            headers={"Retry-After": "1"})

    async def method_not_allowed(request: Request, e: Exception) -> Response:
        if isinstance(e, StarletteHTTPException) and e.status_code == 405:
            allow = _allowed_methods(app, request.url.path)
            if allow:
                return JSONResponse({"detail": "Method Not Allowed"}, status_code=405,
                                    headers={"Allow": ", ".join(allow)})
        return await http_exception_handler(request, e)  # type: ignore[arg-type]

    app.add_exception_handler(StarletteHTTPException, method_not_allowed)
    app.add_exception_handler(UnknownRunError, unknown_run)
    app.add_exception_handler(StoreError, bad_input)
    app.add_exception_handler(RunNotReadyError, unavailable)
    # Any Redis failure (down, timeout, out of memory, read-only replica) is an outage: 503.
    app.add_exception_handler(redis.RedisError, unavailable)


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the spec lists for `path` (Starlette's 405 names only one route's).

    When several templates match, the most specific wins (fewest parameters): a literal
    `/samples/lookup` is not `/samples/{sample_id}`.
    """
    table = getattr(app.state, "path_methods", None)
    if table is None:
        table = []
        for template, ops in app.openapi().get("paths", {}).items():
            pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
            table.append((template.count("{"), re.compile(f"^{pattern}$"),
                          sorted(m.upper() for m in ops)))
        app.state.path_methods = table
    matches = [(params, ms) for params, regex, ms in table if regex.match(path)]
    if not matches:
        return []
    fewest = min(p for p, _ in matches)
    return sorted({m for p, ms in matches if p == fewest for m in ms})


class BodySizeLimit:
    """Answers 413 to bodies over `max_bytes`, by Content-Length or by counting a stream."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        if length is not None:
            if length > self.max_bytes:
                await self._reject(send)
                return
            # The server enforces Content-Length, so the body cannot exceed it.
            await self.app(scope, receive, send)
            return
        # A chunked body: read it (at most max_bytes + 1) before the app sees it.
        messages: list[Message] = []
        size = 0
        while True:
            msg = await receive()
            messages.append(msg)
            if msg["type"] != "http.request":
                break
            size += len(msg.get("body", b""))
            if size > self.max_bytes:
                await self._reject(send)
                return
            if not msg.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed() -> Message:
            nxt = next(replay, None)
            return nxt if nxt is not None else await receive()

        await self.app(scope, replayed, send)

    async def _reject(self, send: Send) -> None:
        body: Any = (b'{"detail":"request body larger than ' + str(self.max_bytes).encode()
                     + b' bytes"}')
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
