"""Pieces every /v1 route module uses: the run path parameter and documented errors."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path
from hardbatch.services.api.schemas import ErrorBody
from hardbatch.services.store import RUN_NAME

RunName = Annotated[
    str, Path(description="Run id: 1-128 letters, digits, '_', '.', '-'.", pattern=RUN_NAME.pattern)
]


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer with."""
    text = {
        400: "Bad request", 401: "Token missing or wrong", 404: "Unknown run or sample",
        409: "Conflicts with a round already composed", 413: "Body too large",
        422: "Invalid parameters", 503: "Table still loading, or Redis unreachable",
    }
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}
