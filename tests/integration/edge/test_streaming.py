"""Streams that end early: errors mid-stream, clients that leave, an edge that stops."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from kvmesh.rpc import RpcServer, open_channel
from kvmesh.telemetry import metrics
from services.edge import EdgeConfig, RunningEdge, serve_in_background
from tests.integration.edge.fake_router import MODEL, FakeRouter

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
BOUND_S = 5.0  # how long a cancellation may take to reach the router


def events(body: str) -> list[Any]:
    """The data of each SSE event; `[DONE]` stays a string."""
    datas = [block.removeprefix("data: ") for block in body.split("\n\n") if block]
    return [d if d == "[DONE]" else json.loads(d) for d in datas]


def cancelled_count(route: str) -> float:
    return float(metrics.EDGE_CANCELLED_GENERATIONS.labels(route)._value.get())


@pytest.mark.parametrize(("prompt", "code"), [("fail-after:UNAVAILABLE", "service_unavailable"),
                                              ("fail-after:INVALID_ARGUMENT", None),
                                              ("no-finish", "bad_gateway")])  # fmt: skip
async def test_error_after_the_first_chunk_is_a_last_event(
    http: httpx.AsyncClient, prompt: str, code: str | None
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True}
    response = await http.post(CHAT, json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    data = events(response.text)
    assert data[-1] == "[DONE]"
    assert [d["choices"][0]["delta"] for d in data[:2]] == [
        {"role": "assistant", "content": ""},
        {"content": "partial"},
    ]
    error = data[-2]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert len(data) == 4


async def test_openai_client_raises_on_a_mid_stream_error(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.completions.create(
        model=MODEL, prompt="fail-after:RESOURCE_EXHAUSTED", stream=True
    )
    texts: list[str] = []

    async def consume() -> None:
        async for chunk in stream:
            texts.append(chunk.choices[0].text)

    with pytest.raises(openai.APIError, match="scripted failure"):
        await consume()
    assert texts == ["partial"]


async def test_client_leaving_mid_stream_cancels_the_router_call(
    http: httpx.AsyncClient, fake: FakeRouter
) -> None:
    before = cancelled_count(CHAT)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hang"}], "stream": True}
    async with http.stream("POST", CHAT, json=body) as response:
        async for line in response.aiter_lines():
            if "partial" in line:
                break  # leaving the block closes the connection mid-stream
    await asyncio.wait_for(fake.cancelled.wait(), BOUND_S)
    assert fake.num_cancelled == 1
    assert cancelled_count(CHAT) == before + 1


@pytest.mark.parametrize("stream", [True, False])
async def test_client_leaving_before_the_first_token_cancels_the_router_call(
    http: httpx.AsyncClient, fake: FakeRouter, stream: bool
) -> None:
    body = {"model": MODEL, "prompt": "hang-first", "stream": stream}
    request = asyncio.create_task(http.post(COMPLETIONS, json=body))
    await asyncio.wait_for(fake.generating.wait(), BOUND_S)
    request.cancel()  # the client gives up while the edge waits for the router
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.wait_for(fake.cancelled.wait(), BOUND_S)


async def test_client_leaving_a_non_streamed_answer_cancels_the_router_call(
    http: httpx.AsyncClient, fake: FakeRouter
) -> None:
    body = {"model": MODEL, "prompt": "hang"}  # one message, then nothing
    request = asyncio.create_task(http.post(COMPLETIONS, json=body))
    await asyncio.wait_for(fake.generating.wait(), BOUND_S)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.wait_for(fake.cancelled.wait(), BOUND_S)


StartEdge = Callable[[EdgeConfig], Awaitable[RunningEdge]]


@pytest.fixture
async def start_edge(router: tuple[FakeRouter, RpcServer]) -> AsyncIterator[StartEdge]:
    """Edges of a test's own, on the module's fake router; stopped after the test."""
    channel = open_channel(router[1].address)
    started: list[RunningEdge] = []

    async def start(config: EdgeConfig) -> RunningEdge:
        started.append(await serve_in_background(config, channel))
        return started[-1]

    yield start
    for edge in started:
        await edge.stop()
    await channel.close()


async def test_stopping_the_edge_cancels_in_flight_streams(
    start_edge: StartEdge, fake: FakeRouter
) -> None:
    edge = await start_edge(EdgeConfig(port=0, shutdown_grace_s=0))
    body = {"model": MODEL, "prompt": "hang", "stream": True}
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=10) as http,
        http.stream("POST", COMPLETIONS, json=body) as response,
    ):
        lines = response.aiter_lines()
        async for line in lines:
            if "partial" in line:
                break
        await asyncio.wait_for(edge.stop(), BOUND_S)
        with pytest.raises(httpx.RemoteProtocolError):  # the stream was cut, not finished
            await rest_of(lines)
    await asyncio.wait_for(fake.cancelled.wait(), BOUND_S)


async def rest_of(lines: AsyncIterator[str]) -> list[str]:
    return [line async for line in lines]


async def test_request_timeout_is_504(start_edge: StartEdge, fake: FakeRouter) -> None:
    edge = await start_edge(EdgeConfig(port=0, request_timeout_s=0.2))
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
        response = await http.post(COMPLETIONS, json={"model": MODEL, "prompt": "hang-first"})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
