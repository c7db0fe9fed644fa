"""Service processes joining and leaving discovery: SIGKILL and SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from kvmesh.api.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.discovery import Discovery, ServiceInstance
from kvmesh.rpc import open_channel
from tests.integration.discovery_backends import embedded

ROOT = Path(__file__).resolve().parents[3]


async def start_sample(registry: str, worker_id: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.rpc.sample_service",
        "--registry", registry, "--ttl", "1", "--worker-id", worker_id, "--grace", "10",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await wait_for_line(process, "serving", timeout_s=60)
    return process


async def wait_for_line(process: asyncio.subprocess.Process, prefix: str, timeout_s: float) -> str:
    assert process.stdout is not None

    async def scan() -> str:
        while True:
            line = (await process.stdout.readline()).decode()  # type: ignore[union-attr]
            if not line:
                raise AssertionError(f"process exited before printing {prefix!r}")
            if line.startswith(prefix):
                return line.strip()

    return await asyncio.wait_for(scan(), timeout_s)


async def wait_until(
    watch: AsyncIterator[list[ServiceInstance]],
    condition: Callable[[list[ServiceInstance]], bool],
    timeout_s: float,
) -> list[ServiceInstance]:
    async def scan() -> list[ServiceInstance]:
        async for instances in watch:
            if condition(instances):
                return instances
        raise AssertionError("watch ended")

    return await asyncio.wait_for(scan(), timeout_s)


def ids(instances: list[ServiceInstance]) -> set[str]:
    return {i.meta["worker_id"] for i in instances}


async def test_killed_service_leaves_within_3s_and_stopped_one_at_once() -> None:
    async with embedded() as registry, Discovery(registry.address()) as discovery:
        watch = discovery.watch("kvmesh-sample", wait_s=5)
        killed = await start_sample(registry.address(), "killed")
        stopped = await start_sample(registry.address(), "stopped")
        try:
            both = await wait_until(watch, lambda i: ids(i) == {"killed", "stopped"}, 20)
            address = next(i.grpc_address for i in both if i.meta["worker_id"] == "stopped")

            started = time.monotonic()
            killed.kill()
            await wait_until(watch, lambda i: ids(i) == {"stopped"}, 10)
            assert time.monotonic() - started < 3.0

            channel = open_channel(address)
            stub = worker_pb2_grpc.WorkerStub(channel)
            in_flight = asyncio.ensure_future(stub.Drain(worker_pb2.DrainRequest(timeout_ms=1500)))
            await wait_for_line(stopped, "draining", timeout_s=10)
            started = time.monotonic()
            stopped.send_signal(signal.SIGTERM)
            await wait_until(watch, lambda i: not i, 5)
            left_after = time.monotonic() - started
            response = await asyncio.wait_for(in_flight, 10)
            finished_after = time.monotonic() - started
            await channel.close()
            assert left_after < 0.5, "deregistration on SIGTERM must not wait for in-flight work"
            assert response.drained
            assert finished_after > left_after
            assert await asyncio.wait_for(stopped.wait(), 15) == 0
        finally:
            for process in (killed, stopped):
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await watch.aclose()  # type: ignore[attr-defined]
