"""Registries to run the discovery suite against: the embedded one, and Consul when installed."""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import aiohttp

from kvmesh.discovery.registry import EmbeddedRegistry

CONSUL = shutil.which("consul")
NO_CONSUL = "no `consul` binary on PATH: the suite ran against the embedded registry only"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def embedded(datacenters: Sequence[str] = ("dc1",)) -> AsyncIterator[EmbeddedRegistry]:
    registry = EmbeddedRegistry(datacenters, port=0)
    await registry.start()
    try:
        yield registry
    finally:
        await registry.stop()


@asynccontextmanager
async def consul_agent() -> AsyncIterator[str]:
    """`consul agent -dev` on free ports; yields its HTTP address once it has a leader."""
    assert CONSUL is not None
    http = free_port()
    ports = [
        "-http-port", str(http), "-dns-port", "-1", "-grpc-port", "-1",
        "-serf-lan-port", str(free_port()), "-serf-wan-port", str(free_port()),
        "-server-port", str(free_port()),
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        CONSUL, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1", *ports,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    address = f"127.0.0.1:{http}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):  # bounded: 30 s
                try:
                    async with session.get(f"http://{address}/v1/status/leader") as response:
                        if response.status == 200 and (await response.text()).strip('"'):
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)  # polling a process that gives no readiness signal
            else:
                raise RuntimeError("consul agent -dev did not elect a leader in 30 s")
        yield address
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)
