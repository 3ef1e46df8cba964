"""Client of the sampler service: plans and hardness queries.

    client = SamplerClient("http://127.0.0.1:8000", token=None)
    plan = client.plan("run-1", rank=0, world_size=2, round=0, batches=64, batch_size=256)
    for batch_ids in plan.ids:
        ...

Plans travel as Arrow IPC (compact, no JSON parsing of 16k numbers); hardness queries as JSON.
Errors are `SamplerError` (with the HTTP status when there is one), so a trainer can fall back
to a local shuffle when the service is unreachable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pyarrow as pa

ARROW_STREAM = "application/vnd.apache.arrow.stream"


class SamplerError(RuntimeError):
    """A failed request: `status` is the HTTP status, or None when the service was unreachable."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Plan:
    """One rank's part of a round.

    Attributes:
        round: round number.
        rank: this rank.
        world_size: ranks sharing the round.
        ids: int64 array (batches, batch_size): batch b is `ids[b]`.
        weights: float32 array of the same shape, or None if not asked for.
        losses: float32 array of the same shape with NaN for ids never scored, or None.
        uniform: whether the round was annealed to uniform sampling.
    """

    round: int
    rank: int
    world_size: int
    ids: np.ndarray
    weights: np.ndarray | None
    losses: np.ndarray | None
    uniform: bool


class SamplerClient:
    """Talks to one sampler service.

    Args:
        base_url: e.g. "http://127.0.0.1:8000".
        token: bearer token, when the service has one.
        timeout_s: per-request timeout.
    """

    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 10.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SamplerClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise SamplerError(f"sampler service at {self.base_url} unreachable: {e}") from e
        if resp.status_code >= 400:
            try:
                body = resp.json()
                detail = body.get("detail", resp.text) if isinstance(body, dict) else resp.text
            except ValueError:
                detail = resp.text
            raise SamplerError(f"{method} {path}: {resp.status_code} {detail}", resp.status_code)
        return resp

    # -- plans -----------------------------------------------------------------------------

    def plan(self, run: str, *, rank: int, world_size: int, round: int, batches: int,
             batch_size: int, with_weights: bool = False, with_losses: bool = False,
             after_losses: bool = False) -> Plan:
        """This rank's plan for one round (composed by the service for all ranks; with
        `after_losses` from all of the previous round's losses, which the service waits for)."""
        body = {"rank": rank, "world_size": world_size, "round": round, "batches": batches,
                "batch_size": batch_size, "with_weights": with_weights,
                "with_losses": with_losses, "after_losses": after_losses}
        resp = self._request("POST", f"/v1/runs/{run}/plans", json=body,
                             headers={"Accept": ARROW_STREAM})
        try:
            return _plan_from_arrow(resp.content, batches, batch_size)
        except (pa.ArrowException, KeyError, ValueError) as e:  # a garbled answer is an outage
            raise SamplerError(f"plan for round {round} unreadable: {e}", 502) from e

    # -- hardness --------------------------------------------------------------------------

    def runs(self) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = self._request("GET", "/v1/runs").json()["runs"]
        return runs

    def run_info(self, run: str) -> dict[str, Any]:
        info: dict[str, Any] = self._request("GET", f"/v1/runs/{run}").json()
        return info

    def sample(self, run: str, sample_id: int) -> dict[str, Any]:
        """One sample's record: id, seen, kept, last_loss, ema, last_step."""
        rec: dict[str, Any] = self._request("GET", f"/v1/runs/{run}/samples/{sample_id}").json()
        return rec

    def samples(self, run: str, ids: list[int] | np.ndarray) -> dict[str, list[Any]]:
        """Records of many samples, as columns in the order asked."""
        ids_list = [int(i) for i in np.asarray(ids).ravel()]
        cols: dict[str, list[Any]] = self._request(
            "POST", f"/v1/runs/{run}/samples/lookup", json={"ids": ids_list}
        ).json()
        return cols

    def top(self, run: str, k: int = 20, order: str = "hardest",
            by: str = "ema") -> list[dict[str, Any]]:
        """The k hardest (or easiest) samples scored so far."""
        params: dict[str, str | int] = {"order": order, "limit": k, "by": by}
        out: list[dict[str, Any]] = self._request(
            "GET", f"/v1/runs/{run}/samples", params=params
        ).json()["samples"]
        return out

    def suspects(self, run: str, limit: int = 20) -> dict[str, Any]:
        """Suspected label errors, most certain first: `{"total", "threshold", "samples"}`.

        Example:
            >>> client.suspects("run-1", limit=5)["samples"][0]["suspect"]  # doctest: +SKIP
            True
        """
        out: dict[str, Any] = self._request(
            "GET", f"/v1/runs/{run}/suspects", params={"limit": limit}).json()
        return out

    def histogram(self, run: str, bins: int = 20, field: str = "ema") -> dict[str, Any]:
        hist: dict[str, Any] = self._request(
            "GET", f"/v1/runs/{run}/histogram", params={"bins": bins, "field": field}
        ).json()
        return hist

    def set_plan_config(self, run: str, **config: Any) -> dict[str, Any]:
        """Sets a run's plan config (alpha, lam, eps, beta, anneal_frac, total_rounds, hardness)."""
        cfg: dict[str, Any] = self._request(
            "PUT", f"/v1/runs/{run}/plan-config", json=config
        ).json()
        return cfg


def _column(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as numpy, read from its buffer: pyarrow's `to_numpy` imports pandas
    the first time (0.2-0.5 s, inside a worker's first round)."""
    col = table.column(name).combine_chunks()
    if col.null_count or not pa.types.is_primitive(col.type):
        return col.to_numpy(zero_copy_only=False)
    dtype = np.dtype(col.type.to_pandas_dtype())
    return np.frombuffer(col.buffers()[1], dtype=dtype, count=len(col),
                         offset=col.offset * dtype.itemsize)


def _plan_from_arrow(payload: bytes, batches: int, batch_size: int) -> Plan:
    table = pa.ipc.open_stream(payload).read_all()
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    # A packed round has fewer batches than asked for: the service says how many.
    shape = (int(meta.get("batches", batches)), batch_size)
    if not 1 <= shape[0] <= batches:
        raise ValueError(f"{shape[0]} batches answered for {batches} asked")
    ids = _column(table, "id").astype(np.int64).reshape(shape)
    names = table.column_names
    weights = _column(table, "weight").reshape(shape) if "weight" in names else None
    losses = None
    if "loss" in names:
        losses = _column(table, "loss").astype(np.float32).reshape(shape)
    return Plan(round=int(meta["round"]), rank=int(meta["rank"]),
                world_size=int(meta["world_size"]), ids=ids, weights=weights, losses=losses,
                uniform=meta.get("uniform") == "true")
