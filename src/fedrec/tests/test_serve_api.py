"""The HTTP API through a real uvicorn server on a free local port, hit with httpx."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fedrec.serve import create_app, running
from fedrec.tests.test_fusion_run import TASKS, small_run


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with running(create_app(small_run())) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c


def test_health_describes_the_loaded_run(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "items": 300, "tasks": list(TASKS), "fusion": "average"}


def test_recommend_returns_k_explained_items(client):
    r = client.post("/recommend", json={"history": ["item-1", "item-2"], "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cold_start"] is False and len(body["items"]) == 4
    assert {"item-1", "item-2"}.isdisjoint(i["item"] for i in body["items"])
    assert all(set(i["explanation"]) == set(TASKS) for i in body["items"])


def test_cold_start_with_a_category(client):
    r = client.post("/recommend", json={"history": [], "k": 3, "category": "kitchen"})
    assert r.status_code == 200, r.text
    assert r.json()["cold_start"] is True
    assert {i["category"] for i in r.json()["items"]} == {"kitchen"}


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"history": ["item-1", "no-such-item"]}, 400, "no-such-item"),
        ({"history": ["item-1"], "k": 0}, 422, "greater than or equal to 1"),
        ({"history": ["item-1"], "k": 301}, 400, "k must be an integer in [1, 300]"),
        ({"history": ["item-1"], "category": "no-such-category"}, 400, "no-such-category"),
        ({"history": [1, 2]}, 422, "valid string"),
        ({"history": ["item-1"], "kk": 3}, 422, "kk"),
        (b"{not json", 422, "JSON decode error"),
        (b"[]", 422, "valid dictionary"),
        # a NaN: FastAPI's own 422 echoed it and could not write it as JSON (a 500)
        (b'{"history": ["item-1"], "k": NaN}', 422, "finite number"),
    ],
)
def test_bad_requests_get_a_clear_4xx_and_the_server_stays_up(client, body, status, needle):
    if isinstance(body, bytes):
        r = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/recommend", json=body)
    assert r.status_code == status, r.text
    assert needle in r.text
    assert client.get("/health").status_code == 200


def test_concurrent_requests_are_all_answered(client):
    def ask(i: int) -> int:
        return client.post("/recommend", json={"history": [f"item-{i}"], "k": 5}).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(ask, range(32))) == {200}


def test_openapi_documents_the_request_and_response(client):
    schema = client.get("/openapi.json").json()
    request = schema["components"]["schemas"]["RecommendRequest"]["properties"]
    assert {"history", "k", "category", "exclude_seen"} <= set(request)
    assert "400" in schema["paths"]["/recommend"]["post"]["responses"]
