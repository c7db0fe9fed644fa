"""/health follows the router, /metrics counts, request ids make the round trip."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmesh.api.v1 import generation_pb2
from kvmesh.rpc import RpcServer, open_channel
from services.edge import EdgeConfig, serve_in_background
from tests.integration.edge.fake_router import MODEL, FakeRouter

CHAT = "/v1/chat/completions"
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
async def restored(router: tuple[FakeRouter, RpcServer]) -> AsyncIterator[None]:
    """Whatever a test does to the fake router's health and models is undone after it."""
    fake, server = router
    models = list(fake.models)
    yield
    fake.models = models
    await server.set_serving(True)


async def health(http: httpx.AsyncClient) -> tuple[int, dict[str, str]]:
    response = await http.get("/health")
    return response.status_code, response.json()


@pytest.mark.usefixtures("restored")
async def test_health_follows_the_router(
    http: httpx.AsyncClient, router: tuple[FakeRouter, RpcServer]
) -> None:
    fake, server = router
    assert await health(http) == (200, {"status": "ok"})

    await server.set_serving(False)
    status, body = await health(http)
    assert status == 503 and "NOT_SERVING" in body["reason"]
    await server.set_serving(True)
    assert (await health(http))[0] == 200

    fake.models = [generation_pb2.ModelInfo(id=MODEL, num_prefill_workers=1)]
    status, body = await health(http)
    assert status == 503 and body["reason"] == "no model has a decode worker"

    fake.models = []
    status, body = await health(http)
    assert status == 503 and body["reason"] == "the router serves no model"

    fake.models = [generation_pb2.ModelInfo(id=MODEL, num_decode_workers=2)]
    assert (await health(http))[0] == 200


async def test_health_without_a_router() -> None:
    channel = open_channel("127.0.0.1:1")  # nothing listens there
    async with (
        await serve_in_background(EdgeConfig(port=0), channel) as edge,
        httpx.AsyncClient(base_url=edge.url) as http,
    ):
        status, body = await health(http)
        assert status == 503 and "UNAVAILABLE" in body["reason"]
        response = await http.post(CHAT, json=HELLO)  # fails fast, not at the deadline
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "service_unavailable"
    await channel.close()


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_the_edge_requests(http: httpx.AsyncClient) -> None:
    ok = ("kvmesh_edge_http_requests_total", "/v1/chat/completions", "POST", "200")
    bad = ("kvmesh_edge_http_requests_total", "/v1/chat/completions", "POST", "400")
    ttft = ("kvmesh_edge_ttft_seconds_count", MODEL)

    def value(
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float], key: tuple[str, ...]
    ) -> float:
        name, *labels = key
        names = ("route", "method", "status") if len(labels) == 3 else ("model",)
        return samples.get((name, frozenset(zip(names, labels, strict=True))), 0.0)

    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    before = scrape(response.text)
    await http.post(CHAT, json=HELLO)
    await http.post(CHAT, json=HELLO | {"stream": True})
    await http.post(CHAT, json={"model": MODEL})
    after = scrape((await http.get("/metrics")).text)
    assert value(after, ok) == value(before, ok) + 2
    assert value(after, bad) == value(before, bad) + 1
    assert value(after, ttft) == value(before, ttft) + 2
    assert ("kvmesh_edge_http_request_seconds_count", frozenset({("route", CHAT)})) in after


async def test_request_id_round_trip(http: httpx.AsyncClient, fake: FakeRouter) -> None:
    response = await http.post(CHAT, json=HELLO, headers={"x-request-id": "client-id-1"})
    assert response.headers["x-request-id"] == "client-id-1"
    assert response.json()["id"] == "chatcmpl-client-id-1"
    assert fake.request_ids == ["client-id-1"]
    assert fake.requests[0].request_id == "client-id-1"

    streamed = await http.post(CHAT, json=HELLO | {"stream": True})  # no header: a new id
    new_id = streamed.headers["x-request-id"]
    assert new_id and new_id != "client-id-1"
    assert f'"id":"chatcmpl-{new_id}"' in streamed.text
    assert fake.request_ids[1] == new_id == fake.requests[1].request_id

    response = await http.get("/v1/models", headers={"x-request-id": "models-1"})
    assert response.headers["x-request-id"] == "models-1"
