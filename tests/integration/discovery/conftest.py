"""Fixtures: a two-datacenter embedded registry on free ports, an HTTP client, a gRPC server
whose health status a test flips, and `Agent`, a small client that waits with blocking
queries (never with sleeps)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from kvmesh.discovery.registry import EmbeddedRegistry


@dataclass(slots=True)
class Reply:
    status: int
    text: str
    headers: dict[str, str]

    @property
    def index(self) -> int:
        return int(self.headers["X-Consul-Index"])

    def json(self) -> Any:
        return json.loads(self.text)


@dataclass(slots=True)
class Agent:
    """HTTP calls to one agent of the registry."""

    session: aiohttp.ClientSession
    address: str

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        body: Any = None,
        data: bytes | str | None = None,
    ) -> Reply:
        if body is not None:
            data = json.dumps(body)
        async with self.session.request(
            method, f"http://{self.address}{path}", params=params, data=data
        ) as response:
            return Reply(response.status, await response.text(), dict(response.headers))

    async def get(self, path: str, **params: Any) -> Reply:
        return await self.call("GET", path, params=params or None)

    async def put(self, path: str, body: Any = None, **params: Any) -> Reply:
        return await self.call("PUT", path, body=body, params=params or None)

    async def until(
        self,
        path: str,
        condition: Callable[[Reply], bool],
        *,
        timeout_s: float = 5.0,
        **params: Any,
    ) -> Reply:
        """Repeat a blocking query on `path` until `condition` holds for its answer."""
        deadline = time.monotonic() + timeout_s
        reply = await self.get(path, **params)
        while not condition(reply):
            if time.monotonic() > deadline:
                raise AssertionError(f"{path}: still {reply.status} {reply.text[:500]}")
            reply = await self.get(path, index=reply.index, wait="1s", **params)
        return reply


@pytest.fixture
async def registry() -> AsyncIterator[EmbeddedRegistry]:
    async with EmbeddedRegistry(["dc1", "dc2"], port=0) as started:
        yield started


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        yield client


@pytest.fixture
def agent(registry: EmbeddedRegistry, session: aiohttp.ClientSession) -> Agent:
    """The agent of dc1."""
    return Agent(session, registry.address("dc1"))


@pytest.fixture
def agent_dc2(registry: EmbeddedRegistry, session: aiohttp.ClientSession) -> Agent:
    return Agent(session, registry.address("dc2"))


@dataclass(slots=True)
class HealthServer:
    """A real gRPC server serving only grpc.health.v1, for the registry's gRPC checks."""

    address: str
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped)

    async def set(self, service: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(service, status)


@pytest.fixture
async def health_server() -> AsyncIterator[HealthServer]:
    server = grpc.aio.server()
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield HealthServer(f"127.0.0.1:{port}", health)
    finally:
        await server.stop(grace=None)


async def elapsed(awaitable: Any) -> tuple[Any, float]:
    """An awaitable's result and how long it took."""
    started = time.monotonic()
    result = await awaitable
    return result, time.monotonic() - started
