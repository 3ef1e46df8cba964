"""Bodies no JSON schema fuzzer sends: NaN, infinities, floats out of range, huge integers.

Hypothesis builds raw request bodies (valid ones with one value replaced by such a token) and
sends them to a real `hardbatch serve` on loopback over one keep-alive connection: every answer
must be a 4xx, and the connection must survive it.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.services.conftest import Service

BAD_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 4301, "-" + "9" * 5000]

VALID = {
    ("POST", "/v1/runs/{run}/plans"): {"rank": 0, "world_size": 1, "round": 0, "batches": 1,
                                       "batch_size": 4},
    ("POST", "/v1/runs/{run}/samples/lookup"): {"ids": [0, 1, 2]},
    ("PUT", "/v1/runs/{run}/plan-config"): {"alpha": 1.0, "lam": 0.1, "eps": 0.001,
                                            "beta": 0.0, "anneal_frac": 0.0,
                                            "total_rounds": 10},
}


def _with_bad_value(body: dict, key: str, bad: str, in_list: bool) -> str:
    """`body` as JSON text with `key`'s value (or its first list item) replaced by `bad`."""
    marker = "__BAD__"
    doc = dict(body)
    if in_list and isinstance(doc[key], list):
        doc[key] = [marker, *doc[key][1:]]
    else:
        doc[key] = marker
    return json.dumps(doc).replace(f'"{marker}"', bad)


@pytest.fixture(scope="module")
def http(service: Service, filled) -> httpx.Client:
    with service.client() as c:
        yield c


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_non_finite_and_huge_numbers_are_4xx_and_keep_the_connection(http, filled, data) -> None:
    run, _ = filled
    (method, path), body = data.draw(st.sampled_from(sorted(VALID.items())))
    key = data.draw(st.sampled_from(sorted(body)))
    bad = data.draw(st.sampled_from(BAD_NUMBERS))
    raw = _with_bad_value(body, key, bad, data.draw(st.booleans()))
    r = http.request(method, path.format(run=run), content=raw,
                     headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (raw[:200], r.status_code, r.text[:300])
    assert "detail" in r.json()
    # The same connection still answers (a 500 used to drop keep-alive).
    assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "1e400", "9" * 4301])
def test_each_bad_number_names_the_problem(http, filled, bad: str) -> None:
    run, _ = filled
    raw = '{"ids": [' + bad + "]}"
    r = http.post(f"/v1/runs/{run}/samples/lookup", content=raw,
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert "JSON" in r.text or "number" in r.text or "digits" in r.text


@pytest.mark.parametrize("digits", [25, 101, 4301, 6000])
def test_huge_sample_id_in_the_path_is_4xx(http, filled, digits: int) -> None:
    run, _ = filled
    r = http.get(f"/v1/runs/{run}/samples/{'7' * digits}")
    assert r.status_code in (404, 422), r.text
    assert http.get("/healthz").status_code == 200
