"""Cache-aware routing in the running mesh: prefixes find their workers, the index follows them.

Two prefill workers, one decode worker. Requests of a group share a 160-token prefix (10 blocks);
after a group's first request, its others must land where the prefix is cached.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvmesh.api.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from kvmesh.rpc import open_channel
from kvmesh.up import Child, Mesh
from tests.e2e.mesh import children, grpc_channel, metric, running_mesh

BLOCK = 16
PREFIX_BLOCKS = 10


def prompt(group: int, question: int) -> list[int]:
    prefix = [1000 + group * 200 + i for i in range(PREFIX_BLOCKS * BLOCK)]
    return [*prefix, *(3000 + question * 7 + i for i in range(20))]


def router(mesh: Mesh) -> Child:
    return next(c for c in mesh.children if c.name == "router")


@pytest.fixture
async def stub(
    tmp_path: Path,
) -> AsyncIterator[tuple[Mesh, generation_pb2_grpc.GenerationAsyncStub]]:
    async with running_mesh(tmp_path, num_prefill=2, worker_args=["--ttl-s", "1"]) as mesh:
        channel = open_channel(mesh.router_address)
        try:
            yield mesh, generation_pb2_grpc.GenerationStub(channel)
        finally:
            await channel.close(None)


async def generate(stub: generation_pb2_grpc.GenerationAsyncStub, ids: list[int]) -> int:
    """Run one request; the prompt tokens the prefill worker found cached."""
    request = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=ids),
        sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
    )
    cached = -1
    async for response in stub.Generate(request, timeout=120):
        if response.HasField("usage"):
            cached = response.usage.cached_prompt_tokens
    assert cached >= 0, "no usage on the last message"
    return cached


async def explain(
    stub: generation_pb2_grpc.GenerationAsyncStub, ids: list[int]
) -> generation_pb2.TierDecision:
    request = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=ids))
    explanation = await stub.ExplainRoute(request, timeout=10)
    assert explanation.disaggregated
    return next(d for d in explanation.decisions if d.tier == common_pb2.TIER_PREFILL)


async def test_requests_follow_their_prefix_and_explain_why(
    stub: tuple[Mesh, generation_pb2_grpc.GenerationAsyncStub],
) -> None:
    mesh, generation = stub
    for group in (0, 1):
        assert await generate(generation, prompt(group, 0)) == 0  # cold
    for question in (1, 2, 3):
        for group in (0, 1):
            cached = await generate(generation, prompt(group, question))
            assert cached == PREFIX_BLOCKS * BLOCK, (group, question)
    decision = await explain(generation, prompt(0, 9))
    chosen = [c for c in decision.candidates if c.chosen]
    assert len(chosen) == 1
    assert chosen[0].cached_blocks == PREFIX_BLOCKS
    assert chosen[0].index_mode == "exact"
    assert decision.reason == "prefix hit"
    other = next(c for c in decision.candidates if not c.chosen)
    assert other.cached_blocks == 0
    assert await metric(router(mesh), "kvmesh_router_kv_index_exact") == 3  # and decode
    hits = await metric(
        router(mesh), 'kvmesh_router_prefix_blocks_total{kind="hit",tier="prefill"}'
    )
    assert hits >= 6 * PREFIX_BLOCKS


async def test_a_killed_worker_leaves_the_index_and_the_prefix_moves(
    stub: tuple[Mesh, generation_pb2_grpc.GenerationAsyncStub],
) -> None:
    mesh, generation = stub
    assert await generate(generation, prompt(0, 0)) == 0
    holder = next(c for c in (await explain(generation, prompt(0, 1))).candidates if c.chosen)
    assert holder.cached_blocks == PREFIX_BLOCKS
    by_id = {await worker_id_of(c): c for c in children(mesh, "prefill")}
    victim = by_id[holder.worker_id]
    victim.process.send_signal(signal.SIGKILL)
    for _ in range(200):  # bounded: discovery drops it after its TTL check goes critical
        decision = await explain(generation, prompt(0, 1))
        if all(c.worker_id != holder.worker_id for c in decision.candidates):
            break
        await asyncio.sleep(0.05)  # polling the router's view
    else:
        raise AssertionError("the killed worker stayed in the router's candidates")
    assert all(c.cached_blocks == 0 for c in decision.candidates)  # its entries left with it
    assert await generate(generation, prompt(0, 2)) == 0  # recomputed on the survivor
    assert await generate(generation, prompt(0, 3)) == PREFIX_BLOCKS * BLOCK  # and cached there


async def worker_id_of(child: Child) -> str:
    async with grpc_channel(child) as channel:
        info = await worker_pb2_grpc.WorkerStub(channel).GetInfo(worker_pb2.GetInfoRequest())
    return info.worker_id


async def test_workers_without_kv_events_are_routed_approximately(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, num_prefill=2, worker_args=["--no-kv-events"]) as mesh:
        channel = open_channel(mesh.router_address)
        try:
            generation = generation_pb2_grpc.GenerationStub(channel)
            assert await generate(generation, prompt(0, 0)) == 0
            for question in (1, 2):  # the router remembers where it sent the prefix
                assert await generate(generation, prompt(0, question)) == PREFIX_BLOCKS * BLOCK
            decision = await explain(generation, prompt(0, 3))
            assert {c.index_mode for c in decision.candidates} == {"approximate"}
            assert next(c for c in decision.candidates if c.chosen).cached_blocks == PREFIX_BLOCKS
            fallbacks = await metric(router(mesh), "kvmesh_router_kv_index_fallbacks_total")
            assert fallbacks >= 2
            assert await metric(router(mesh), "kvmesh_router_kv_index_exact") == 0
        finally:
            await channel.close(None)
