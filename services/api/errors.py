"""Errors as clear 4xx/503 answers, strict JSON bodies, and the request body size limit.

JSON as Python reads it accepts `NaN`, `Infinity` and `1e400` (which becomes infinity), and
integers of any length up to a 4,300-digit limit whose breach is not a JSON error. None of
these is valid JSON or a valid value of any field here: `StrictJSONRoute` refuses them as
malformed JSON (422), and validation errors are made safe to render, whatever input they echo.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from hardbatch.services.live_runs import RunNotReadyError
from hardbatch.services.store import StoreError, UnknownRunError
from starlette.convertors import Convertor, register_url_convertor
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

    async def invalid_request(_: Request, e: Exception) -> JSONResponse:
        errors = e.errors() if isinstance(e, RequestValidationError) else []
        return JSONResponse({"detail": _json_safe(jsonable_encoder(errors))}, status_code=422)

    app.add_exception_handler(RequestValidationError, invalid_request)
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


# -- strict JSON ---------------------------------------------------------------------------

MAX_INT_DIGITS = 100  # no field takes more; Python's own limit (4,300) raises a non-JSON error


def _bad_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (use a finite number)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a 64-bit float")
    return value


def _short_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most "
                         f"{MAX_INT_DIGITS})")
    return int(text)


def strict_json_loads(body: bytes | str) -> Any:
    """`json.loads` that refuses NaN, infinities, floats out of range and huge integers,
    with a `json.JSONDecodeError` (what FastAPI answers 422 to)."""
    doc = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    try:
        return json.loads(doc, parse_constant=_bad_constant, parse_float=_finite_float,
                          parse_int=_short_int)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as e:
        raise json.JSONDecodeError(str(e), doc, 0) from None


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_json_loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is parsed by `strict_json_loads` (every router uses it)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict


def _json_safe(value: Any) -> Any:
    """Validation errors echo the input: non-finite floats and huge ints become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        return "an integer too large to echo"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class SampleIdConvertor(Convertor[Any]):
    """`{x:sample_id}`: digits only (like `int`), but a number too long for Python's int()
    is handed on as text, for validation to refuse with a 422 instead of a crash."""

    regex = "[0-9]+"

    def convert(self, value: str) -> Any:
        return int(value) if len(value) <= MAX_INT_DIGITS else value

    def to_string(self, value: Any) -> str:
        return str(value)


register_url_convertor("sample_id", SampleIdConvertor())
