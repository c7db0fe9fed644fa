"""`kvmesh bench-registry`: how fast the registry tells watchers, and how much it can take.

- notification latency: a watcher holds a blocking query on `health/service/<name>?passing`;
  the benchmark registers an instance and passes its TTL check, and measures from the start of
  the registration to the watcher's answer (then deregisters, and measures that too);
- throughput: concurrent clients registering distinct instances, then issuing health queries,
  for a fixed time each.

The registry runs in its own process (`kvmesh registry`), or at `--address`.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from kvmesh.discovery import Discovery, Registration


@dataclass(slots=True)
class RegistryBenchmark:
    address: str
    samples: int
    register_to_notify_p50_ms: float
    register_to_notify_p99_ms: float
    deregister_to_notify_p50_ms: float
    deregister_to_notify_p99_ms: float
    concurrency: int
    registrations_per_s: float
    health_queries_per_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.asynccontextmanager
async def registry_process(port: int) -> AsyncIterator[str]:
    """A `kvmesh registry` child process; yields its address once it listens."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvmesh.cli", "registry", "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        if "http://" not in line:
            raise RuntimeError(f"kvmesh registry did not start: {line!r}")
        yield line.rsplit("http://", 1)[1].strip()
    finally:
        process.terminate()
        await process.wait()


def _registration(name: str, port: int) -> Registration:
    return Registration(
        name=name, service_id=f"{name}-{uuid.uuid4().hex[:12]}", address="127.0.0.1", port=port,
        ttl_s=60.0, deregister_critical_after_s=120.0,
    )  # fmt: skip


async def notification_latency(
    discovery: Discovery, samples: int
) -> tuple[list[float], list[float]]:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    index, _ = await discovery.healthy(name)
    registered: list[float] = []
    deregistered: list[float] = []
    for i in range(samples):
        reg = _registration(name, 10_000 + i)
        for target, sink in ((1, registered), (0, deregistered)):
            waiter = asyncio.ensure_future(_wait_for_count(discovery, name, index, target))
            await asyncio.sleep(0)  # let the watcher's query go out first
            started = time.perf_counter()
            if target:
                await discovery.register(reg)
                await discovery.pass_ttl(reg.check_id)
            else:
                await discovery.deregister(reg.service_id)
            index = await waiter
            sink.append((time.perf_counter() - started) * 1000)
    return registered, deregistered


async def _wait_for_count(discovery: Discovery, name: str, index: int, count: int) -> int:
    while True:
        index, healthy = await discovery.healthy(name, index=index, wait_s=10)
        if len(healthy) == count:
            return index


async def throughput(address: str, concurrency: int, seconds: float) -> tuple[float, float]:
    """Writes/s re-registering a bounded set of instances, then reads/s of a service that has
    ten passing instances (the size a watcher of one tier typically sees)."""
    clients = [Discovery(address) for _ in range(concurrency)]
    name = f"bench-load-{uuid.uuid4().hex[:8]}"
    try:
        queried = f"{name}-tier"
        for i in range(10):
            reg = _registration(queried, 30_000 + i)
            await clients[0].register(reg)
            await clients[0].pass_ttl(reg.check_id)

        async def register_loop(n: int, client: Discovery, deadline: float) -> int:
            count = 0
            while time.perf_counter() < deadline:
                reg = _registration(name, 20_000 + count % 16)
                await client.register(replace(reg, service_id=f"{name}-{n}-{count % 16}"))
                count += 1
            return count

        async def query_loop(n: int, client: Discovery, deadline: float) -> int:
            count = 0
            while time.perf_counter() < deadline:
                _, healthy = await client.healthy(queried)
                assert len(healthy) == 10
                count += 1
            return count

        rates = []
        for loop in (register_loop, query_loop):
            deadline = time.perf_counter() + seconds
            started = time.perf_counter()
            counts = await asyncio.gather(*(loop(n, c, deadline) for n, c in enumerate(clients)))
            rates.append(sum(counts) / (time.perf_counter() - started))
        return rates[0], rates[1]
    finally:
        for client in clients:
            await client.close()


async def run(
    address: str | None, *, samples: int, concurrency: int, seconds: float, port: int
) -> RegistryBenchmark:
    async with contextlib.AsyncExitStack() as stack:
        if address is None:
            address = await stack.enter_async_context(registry_process(port))
        discovery = await stack.enter_async_context(Discovery(address))
        registered, deregistered = await notification_latency(discovery, samples)
        registrations, queries = await throughput(address, concurrency, seconds)
    return RegistryBenchmark(
        address=address,
        samples=samples,
        register_to_notify_p50_ms=statistics.median(registered),
        register_to_notify_p99_ms=_percentile(registered, 0.99),
        deregister_to_notify_p50_ms=statistics.median(deregistered),
        deregister_to_notify_p99_ms=_percentile(deregistered, 0.99),
        concurrency=concurrency,
        registrations_per_s=registrations,
        health_queries_per_s=queries,
    )
