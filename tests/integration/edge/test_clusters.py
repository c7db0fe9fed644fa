"""One edge in front of two clusters (fake routers): spillover, failover, resume, cordons."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from prometheus_client import REGISTRY

from kvmesh.api.v1 import common_pb2, generation_pb2
from kvmesh.discovery import Discovery, Registration
from kvmesh.discovery.keys import CORDON_PREFIX, cordon_key
from kvmesh.discovery.registry import EmbeddedRegistry
from kvmesh.rpc import RpcServer, open_channel
from services.edge import EdgeConfig, RunningEdge, serve_in_background
from tests.integration.edge.fake_router import MODEL, FakeRouter, start_fake_router

CHAT = "/v1/chat/completions"
WORDS = "one two three four five six"
ASK = {"model": MODEL, "messages": [{"role": "user", "content": WORDS}]}

Cordon = Callable[..., Awaitable[None]]


@pytest.fixture(scope="module")
async def routers() -> AsyncIterator[dict[str, tuple[FakeRouter, RpcServer]]]:
    started = {"home": await start_fake_router(), "away": await start_fake_router()}
    yield started
    for _, server in started.values():
        await server.stop(0)


@pytest.fixture
def home(routers: dict[str, tuple[FakeRouter, RpcServer]]) -> FakeRouter:
    routers["home"][0].reset()
    return routers["home"][0]


@pytest.fixture
def away(routers: dict[str, tuple[FakeRouter, RpcServer]]) -> FakeRouter:
    routers["away"][0].reset()
    return routers["away"][0]


@pytest.fixture(scope="module")
async def registry() -> AsyncIterator[EmbeddedRegistry]:
    async with EmbeddedRegistry(["dc1"], port=0) as started:
        yield started


@pytest.fixture(scope="module")
async def edge(
    routers: dict[str, tuple[FakeRouter, RpcServer]], registry: EmbeddedRegistry
) -> AsyncIterator[RunningEdge]:
    channels = {name: open_channel(server.address) for name, (_, server) in routers.items()}
    config = EdgeConfig(
        port=0,
        clusters=tuple((name, routers[name][1].address) for name in ("away", "home")),
        home="home",
        registry=registry.address(),
        shutdown_grace_s=0,
    )
    async with await serve_in_background(config, channels) as running:
        yield running
    for channel in channels.values():
        await channel.close()


@pytest.fixture
async def http(edge: RunningEdge) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:
        yield client


@pytest.fixture
async def cordon(edge: RunningEdge, registry: EmbeddedRegistry) -> AsyncIterator[Cordon]:
    """`await cordon("home", ...)`: those clusters are cordoned, and the edge knows it."""
    async with Discovery(registry.address()) as discovery:

        async def set_cordons(*names: str) -> None:
            for name in names:
                await discovery.kv_put(cordon_key(name), "test")
            await edge.clusters.wait_for_cordons(set(names))

        yield set_cordons
        for entry in (await discovery.kv_list(CORDON_PREFIX))[1]:
            await discovery.kv_delete(entry.key)
        await edge.clusters.wait_for_cordons(set())


def counted(cluster: str, outcome: str) -> float:
    labels = {"cluster": cluster, "outcome": outcome}
    return REGISTRY.get_sample_value("kvmesh_edge_cluster_requests_total", labels) or 0.0


def sse_content(text: str) -> tuple[str, list[dict[str, object]]]:
    """The streamed content, and any error events."""
    content, failures = "", []
    for line in text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line.removeprefix("data: "))
        if "error" in chunk:
            failures.append(chunk["error"])
        for choice in chunk.get("choices", []):
            content += choice["delta"].get("content") or ""
    return content, failures


async def test_home_first_with_the_spill_key_and_nothing_else_when_it_serves(
    http: httpx.AsyncClient, home: FakeRouter, away: FakeRouter
) -> None:
    before = counted("home", "served")
    response = await http.post(CHAT, json=ASK)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == WORDS
    assert home.spill == [True]  # not the last cluster: it may refuse at once
    assert away.requests == []
    assert counted("home", "served") == before + 1


async def test_a_saturated_home_spills_to_the_other_cluster(
    http: httpx.AsyncClient, home: FakeRouter, away: FakeRouter
) -> None:
    home.saturated = True
    spilled, served = counted("home", "spilled"), counted("away", "served")
    response = await http.post(CHAT, json=ASK | {"stream": True})
    assert response.status_code == 200
    assert sse_content(response.text) == (WORDS, [])
    assert home.spill == [True]
    assert away.spill == [False]  # the last cluster: no refusal, it queues or wakes
    assert counted("home", "spilled") == spilled + 1
    assert counted("away", "served") == served + 1


async def test_an_unavailable_home_fails_over(
    http: httpx.AsyncClient, home: FakeRouter, away: FakeRouter
) -> None:
    home.unavailable = True
    failed_over = counted("home", "failed_over")
    response = await http.post(CHAT, json=ASK)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == WORDS
    assert len(home.requests) == len(away.requests) == 1
    assert counted("home", "failed_over") == failed_over + 1


async def test_other_errors_are_the_answer_and_no_other_cluster_is_tried(
    http: httpx.AsyncClient, home: FakeRouter, away: FakeRouter
) -> None:
    response = await http.post(CHAT, json=ASK | {"temperature": -1})
    assert response.status_code == 400
    assert "temperature" in response.json()["error"]["message"]
    assert away.requests == []


async def test_the_last_clusters_refusal_is_the_answer(
    http: httpx.AsyncClient, home: FakeRouter, away: FakeRouter
) -> None:
    home.unavailable = away.unavailable = True
    response = await http.post(CHAT, json=ASK)
    assert response.status_code == 503
    assert len(home.requests) == len(away.requests) == 1  # each cluster once


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_a_stream_broken_mid_way_resumes_on_the_other_cluster(
    http: httpx.AsyncClient, home: FakeRouter, away: FakeRouter, stream: bool
) -> None:
    home.break_after = 2
    response = await http.post(CHAT, json=ASK | {"stream": stream, "max_tokens": 5})
    assert response.status_code == 200
    if stream:
        assert sse_content(response.text) == ("one two three four five", [])
    else:
        body = response.json()
        assert body["choices"][0]["message"]["content"] == "one two three four five"
        assert body["usage"]["completion_tokens"] == 5
    assert home.requests[0].return_token_ids  # the edge asks, to resume with them
    (resumed,) = away.requests
    assert list(resumed.resume_token_ids) == [100, 101]  # exactly the tokens streamed
    assert resumed.sampling.max_tokens == 5
    assert away.spill == [False]


async def test_a_stream_broken_on_every_cluster_ends_with_an_error_event(
    http: httpx.AsyncClient, home: FakeRouter, away: FakeRouter
) -> None:
    home.break_after = away.break_after = 2
    response = await http.post(CHAT, json=ASK | {"stream": True})
    content, failures = sse_content(response.text)
    assert content == "one two three four"
    assert [f["code"] for f in failures] == ["service_unavailable"]
    assert list(away.requests[0].resume_token_ids) == [100, 101]
    assert len(home.requests) == 1  # each cluster once


async def test_token_ids_reach_only_a_client_that_asked(
    edge: RunningEdge, home: FakeRouter, away: FakeRouter
) -> None:
    home.break_after = 1
    for asked in (False, True):
        request = generation_pb2.GenerateRequest(
            request_id=f"ids-{asked}",
            model=MODEL,
            text="a b c",
            return_token_ids=asked,
        )
        stream = edge.clusters.generate(request)
        messages = []
        while (message := await stream.next()) is not None:
            messages.append(message)
        assert [m.text for m in messages] == ["a", " b", " c"]
        assert messages[-1].finish_reason == common_pb2.FINISH_REASON_STOP
        ids = [i for m in messages for i in m.token_ids]
        assert ids == ([100, 101, 102] if asked else [])


async def test_a_cordoned_home_gets_no_requests(
    http: httpx.AsyncClient, home: FakeRouter, away: FakeRouter, cordon: Cordon
) -> None:
    await cordon("home")
    response = await http.post(CHAT, json=ASK)
    assert response.status_code == 200
    assert home.requests == []
    assert away.spill == [False]  # the only cluster left is the last one
    assert (await http.get("/health")).status_code == 200


async def test_every_cluster_cordoned_is_503(
    http: httpx.AsyncClient, home: FakeRouter, away: FakeRouter, cordon: Cordon
) -> None:
    await cordon("home", "away")
    response = await http.post(CHAT, json=ASK)
    assert response.status_code == 503
    assert "every cluster is cordoned" in response.json()["error"]["message"]
    assert home.requests == away.requests == []
    health = await http.get("/health")
    assert health.status_code == 503
    assert health.json()["reason"] == "home: cordoned; away: cordoned"


async def test_health_needs_one_serving_cluster(
    http: httpx.AsyncClient, routers: dict[str, tuple[FakeRouter, RpcServer]]
) -> None:
    home_server, away_server = routers["home"][1], routers["away"][1]
    try:
        await home_server.set_serving(False)
        assert (await http.get("/health")).status_code == 200
        await away_server.set_serving(False)
        health = await http.get("/health")
        assert health.status_code == 503
        reason = health.json()["reason"]
        assert reason.startswith("home: the router is NOT_SERVING; away: the router is")
    finally:
        await home_server.set_serving(True)
        await away_server.set_serving(True)


async def test_a_dead_home_router_fails_over() -> None:
    dead_address = "127.0.0.1:1"  # nothing listens there
    channels = {"dead": open_channel(dead_address)}
    fake, server = await start_fake_router()
    channels["live"] = open_channel(server.address)
    config = EdgeConfig(
        port=0, clusters=(("dead", dead_address), ("live", server.address)), shutdown_grace_s=0
    )
    try:
        async with (
            await serve_in_background(config, channels) as running,
            httpx.AsyncClient(base_url=running.url, timeout=10) as client,
        ):
            response = await client.post(CHAT, json=ASK)
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"] == WORDS
            assert fake.spill == [False]
            models = await client.get("/v1/models")  # from the first cluster that answers
            assert [m["id"] for m in models.json()["data"]] == [MODEL]
    finally:
        for channel in channels.values():
            await channel.close()
        await server.stop(0)


async def test_one_clusters_routers_found_in_discovery_balance_and_resume_a_broken_stream() -> None:
    """`--discover-routers`: the passing `kvmesh-router` instances of the registry; requests
    take them in turn, and a stream whose router breaks resumes on the other."""
    first, first_server = await start_fake_router()
    second, second_server = await start_fake_router()
    async with (
        EmbeddedRegistry(["dc1"], port=0) as registry,
        Discovery(registry.address()) as discovery,
    ):
        for i, server in enumerate((first_server, second_server)):
            host, _, port = server.address.rpartition(":")
            registration = Registration(
                name="kvmesh-router", service_id=f"router-{i}", address=host, port=int(port),
                ttl_s=30,
            )  # fmt: skip
            await discovery.register(registration)
            await discovery.pass_ttl(registration.check_id)
        config = EdgeConfig(
            port=0,
            clusters=(("default", "127.0.0.1:1"),),  # nothing there: discovery replaces it
            registry=registry.address(),
            discover_routers=True,
            shutdown_grace_s=0,
        )
        try:
            async with (
                await serve_in_background(config) as running,
                httpx.AsyncClient(base_url=running.url, timeout=10) as client,
            ):
                deadline = asyncio.get_running_loop().time() + 10
                while len(running.clusters.clusters[0].routers.addresses) < 2:
                    assert asyncio.get_running_loop().time() < deadline, "routers not found"
                    await asyncio.sleep(0.05)  # the discovery watch's first answer
                for _ in range(4):
                    assert (await client.post(CHAT, json=ASK)).status_code == 200
                assert len(first.requests) == len(second.requests) == 2  # round robin
                first.reset()
                second.reset()
                first.break_after = 2  # a router that dies mid-stream
                for _ in range(2):  # round robin: one of them starts on it
                    response = await client.post(CHAT, json=ASK | {"stream": True, "max_tokens": 5})
                    assert sse_content(response.text) == ("one two three four five", [])
                resumed = [list(r.resume_token_ids) for r in second.requests if r.resume_token_ids]
                assert resumed == [[100, 101]]
        finally:
            await first_server.stop(0)
            await second_server.stop(0)
