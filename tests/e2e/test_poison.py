"""Poison-request isolation, as real processes: one planted request among 20 streams.

The workers run with the test-only fault hook (`KVMESH_TEST_POISON_TOKEN` in their
environment): a step that computes the planted token raises. The engine retries the batch
without its newest requests until the culprit is alone, so only that request fails (INTERNAL,
with a message); the router tries it on one more worker, no more. The other 19 stream to their
end, and afterwards nothing is left pinned.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from kvmesh.api.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from kvmesh.engine.faults import POISON_ENV
from kvmesh.rpc import open_channel
from kvmesh.up import Mesh
from tests.e2e.mesh import metric, sim_mesh, still_serving_and_whole

POISON = 4242
STREAMS = 20
PLANTED = 13
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def planted_fault() -> Iterator[None]:
    """The workers' environment (children inherit it): the hook is on in this mesh only."""
    os.environ[POISON_ENV] = str(POISON)
    yield
    del os.environ[POISON_ENV]


@pytest.fixture(scope="module")
async def mesh(
    tmp_path_factory: pytest.TempPathFactory, planted_fault: None
) -> AsyncIterator[Mesh]:
    async with sim_mesh(
        tmp_path_factory.mktemp("poison") / "logs",
        speed=5,
        num_decode=2,
        disagg_min_tokens=0,
        worker_args=["--lease-s", "2"],
    ) as running:
        yield running


def prompt(i: int) -> list[int]:
    tokens = [100 + 7 * i + k for k in range(40)]  # never 4242
    if i == PLANTED:
        tokens[20] = POISON
    return tokens


async def stream(stub: generation_pb2_grpc.GenerationStub, i: int) -> list[int] | grpc.StatusCode:
    request = generation_pb2.GenerateRequest(
        request_id=f"stream-{i}",
        token_ids=generation_pb2.TokenIds(ids=prompt(i)),
        sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
        return_token_ids=True,
    )
    tokens: list[int] = []
    try:
        async for response in stub.Generate(request, timeout=60):
            tokens += response.token_ids
    except grpc.aio.AioRpcError as e:
        return e.code()
    return tokens


async def test_only_the_planted_request_fails_and_on_at_most_two_workers(mesh: Mesh) -> None:
    workers = mesh.workers("prefill") + mesh.workers("decode")
    failed_before = sum([await metric(w, "kvmesh_engine_requests_failed_total") for w in workers])
    async with open_channel(mesh.router_address, wait_for_ready=False) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        results = await asyncio.gather(*(stream(stub, i) for i in range(STREAMS)))
    assert results[PLANTED] is grpc.StatusCode.INTERNAL
    assert all(
        isinstance(r, list) and len(r) == MAX_TOKENS for i, r in enumerate(results) if i != PLANTED
    ), results
    failed = sum([await metric(w, "kvmesh_engine_requests_failed_total") for w in workers])
    assert 1 <= failed - failed_before <= 2  # the planted request, on at most two workers
    await still_serving_and_whole(mesh)
