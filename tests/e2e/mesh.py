"""Start the real mesh (`kvmesh.up.Mesh`) on free ports for end-to-end tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc

from kvmesh.api.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.rpc import open_channel
from kvmesh.security.tls import TlsIdentity
from kvmesh.telemetry.scrape import scrape, total
from kvmesh.up import Child, Mesh, UpConfig


@asynccontextmanager
async def running_mesh(
    tmp_path: Path,
    *,
    num_prefill: int = 1,
    num_decode: int = 1,
    disagg_min_tokens: int = 0,
    worker_args: list[str] | None = None,
) -> AsyncIterator[Mesh]:
    config = UpConfig(
        num_prefill=num_prefill,
        num_decode=num_decode,
        registry_port=0,
        router_port=0,
        edge_port=0,
        device="cpu",
        disagg_min_tokens=disagg_min_tokens,
        log_dir=tmp_path / "logs",
        extra_worker_args=["--num-blocks", "512", *(worker_args or [])],
    )
    mesh = Mesh(config)
    try:
        await mesh.start()
        yield mesh
    finally:
        await mesh.stop()


SIM_MODEL = "dummy:smollm2-135m"  # SmolLM2's shape, tokenizer and chat template: no weights


@asynccontextmanager
async def sim_mesh(
    log_dir: Path,
    *,
    speed: float,
    worker_args: Sequence[str] = (),
    **config: Any,
) -> AsyncIterator[Mesh]:
    """The mesh on free ports with sim workers (no torch, no weights) running at `speed` times
    a real GPU; `config` sets any other `UpConfig` field."""
    settings: dict[str, Any] = {
        "model": SIM_MODEL,
        "registry_port": 0,
        "router_port": 0,
        "edge_port": 0,
        "device": "cpu",
        "log_dir": log_dir,
        "extra_worker_args": [
            "--engine", "sim", "--engine-arg", f"speed={speed}", *worker_args,
        ],
    } | config  # fmt: skip
    mesh = Mesh(UpConfig(**settings))
    try:
        await mesh.start()
        yield mesh
    finally:
        await mesh.stop()


def children(mesh: Mesh, tier: str) -> list[Child]:
    return [c for c in mesh.children if c.name.startswith(f"{tier}-")]


def metrics_port(child: Child) -> int:
    return child.metrics_port


async def metric(child: Child, name: str) -> float:
    """The sum of a metric's samples on one child (all label sets)."""
    return total(await scrape(metrics_port(child)), name)


def grpc_address(child: Child) -> str:
    return child.address


@asynccontextmanager
async def grpc_channel(
    child: Child, identity: TlsIdentity | None = None
) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to `child`: plaintext, or mutual TLS as `identity` on a secure mesh."""
    channel = open_channel(grpc_address(child), identity=identity)
    try:
        yield channel
    finally:
        await channel.close(None)


async def still_serving_and_whole(mesh: Mesh) -> None:
    """Every worker answers, and once leases (run the workers with short ones: `--lease-s 2`)
    have run out, nothing is pinned. The mesh's plaintext channels: not for a secure mesh."""
    deadline = time.monotonic() + 20
    for child in mesh.workers("prefill") + mesh.workers("decode"):
        channel = open_channel(child.address, wait_for_ready=False)
        try:
            stub = worker_pb2_grpc.KvTransferStub(channel)
            while True:
                stats = await stub.GetTransferStats(worker_pb2.GetTransferStatsRequest(), timeout=5)
                if stats.active_leases == 0 and stats.pinned_blocks == 0:
                    break
                assert time.monotonic() < deadline, f"{child.name} still holds {stats}"
                await asyncio.sleep(0.2)  # leases expire on their own clock
            load = await worker_pb2_grpc.WorkerStub(channel).GetInfo(
                worker_pb2.GetInfoRequest(), timeout=5
            )
            assert load.worker_id
        finally:
            await channel.close(None)
