"""The edge served by uvicorn on 127.0.0.1 in front of a fake router, for the whole module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from openai import AsyncOpenAI

from kvmesh.rpc import RpcServer, open_channel
from services.edge import EdgeConfig, RunningEdge, serve_in_background
from tests.integration.edge.fake_router import FakeRouter, start_fake_router

MAX_BODY_BYTES = 64 * 1024


@pytest.fixture(scope="module")
async def router() -> AsyncIterator[tuple[FakeRouter, RpcServer]]:
    fake, server = await start_fake_router()
    yield fake, server
    await server.stop(0)


@pytest.fixture
def fake(router: tuple[FakeRouter, RpcServer]) -> FakeRouter:
    router[0].reset()
    return router[0]


@pytest.fixture(scope="module")
async def edge(router: tuple[FakeRouter, RpcServer]) -> AsyncIterator[RunningEdge]:
    channel = open_channel(router[1].address)
    config = EdgeConfig(port=0, max_body_bytes=MAX_BODY_BYTES, shutdown_grace_s=1)
    async with await serve_in_background(config, channel) as running:
        yield running
    await channel.close()


@pytest.fixture
async def http(edge: RunningEdge) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:
        yield client


@pytest.fixture
async def openai_client(edge: RunningEdge) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(base_url=f"{edge.url}/v1", api_key="unused", max_retries=0, timeout=10)
    yield client
    await client.close()
