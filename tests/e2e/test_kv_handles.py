"""Lease-bound KV handles, as real processes on 127.0.0.1: on a plain mesh (no TLS), and under
`kvmesh up --secure` as a caller holding the router's certificate (the only role that may call
Prefill and Decode there, so the one a stolen or compromised identity would be).

On a plain mesh anyone who reaches a port can call Prefill and get a genuine handle; before handles
were signed and bound to their prompt, replaying one with another prompt made the decode worker
cache the first prompt's KV under the second prompt's hashes. Now the decode worker refuses a
handle that is forged, altered or presented with another prompt, reads nothing, and its prefix
cache is unchanged; a genuine handle with its own prompt still moves the KV.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import grpc
import pytest

from kvmesh.api.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from kvmesh.security.roles import Role
from kvmesh.security.tls import TlsIdentity
from kvmesh.telemetry.scrape import scrape, total
from kvmesh.up import Child, Mesh
from tests.e2e.mesh import grpc_channel, metric, running_mesh

GREEDY = common_pb2.SamplingParams(max_tokens=4, temperature=0)
PROMPT_A = list(range(200, 264))  # 64 tokens: four full blocks of 16
PROMPT_B = list(range(300, 364))


@pytest.fixture(scope="module")
async def plain_mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with running_mesh(Path(tmp_path_factory.mktemp("handles"))) as running:
        yield running


@pytest.fixture(scope="module", params=["plain_mesh", "secure_mesh"])
def mesh(request: pytest.FixtureRequest) -> Mesh:
    running: Mesh = request.getfixturevalue(request.param)
    return running


def only(mesh: Mesh, tier: str) -> Child:
    (child,) = mesh.workers(tier)
    return child


def to(mesh: Mesh, tier: str) -> AbstractAsyncContextManager[grpc.aio.Channel]:
    """A channel to the tier's worker; on a secure mesh, as the router."""
    tls_dir = mesh.config.tls_dir
    identity = TlsIdentity.load(tls_dir, Role.ROUTER) if tls_dir is not None else None
    return grpc_channel(only(mesh, tier), identity)


async def prefill(
    mesh: Mesh, request_id: str, prompt: list[int], lease_ms: int | None = None
) -> worker_pb2.PrefillResponse:
    request = worker_pb2.PrefillRequest(
        request_id=request_id, prompt_token_ids=prompt, sampling=GREEDY, lease_ms=lease_ms
    )
    async with to(mesh, "prefill") as channel:
        response: worker_pb2.PrefillResponse = await worker_pb2_grpc.PrefillStub(channel).Prefill(
            request, timeout=60
        )
    assert response.HasField("kv_handle")
    return response


async def decode(
    mesh: Mesh, prompt: list[int], first: int, handle: common_pb2.KvHandle | None
) -> list[int]:
    request = worker_pb2.DecodeRequest(
        request_id=handle.request_id if handle else "local",
        prompt_token_ids=prompt,
        generated_token_ids=[first],
        sampling=GREEDY,
        kv_handle=handle,
    )
    tokens: list[int] = []
    async with to(mesh, "decode") as channel:
        async for response in worker_pb2_grpc.DecodeStub(channel).Decode(request, timeout=60):
            tokens += response.token_ids
    return tokens


async def cached_hashes(mesh: Mesh) -> set[int]:
    async with to(mesh, "decode") as channel:
        snapshot = await worker_pb2_grpc.WorkerStub(channel).GetKvSnapshot(
            worker_pb2.GetKvSnapshotRequest(), timeout=10
        )
    return set(snapshot.block_hashes)


async def release(mesh: Mesh, handle: common_pb2.KvHandle, token: bytes) -> bool:
    async with to(mesh, "prefill") as channel:
        response = await worker_pb2_grpc.KvTransferStub(channel).ReleaseLease(
            worker_pb2.ReleaseLeaseRequest(request_id=handle.request_id, release_token=token),
            timeout=10,
        )
    return response.released


async def refused(mesh: Mesh, prompt: list[int], first: int, handle: common_pb2.KvHandle) -> str:
    before = await cached_hashes(mesh)
    received = await metric(only(mesh, "decode"), "kvmesh_kv_transfer_bytes_total")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await decode(mesh, prompt, first, handle)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert await cached_hashes(mesh) == before  # nothing cached under the prompt's hashes
    assert await metric(only(mesh, "decode"), "kvmesh_kv_transfer_bytes_total") == received
    return caught.value.details() or ""


async def test_a_genuine_handle_replayed_with_another_prompt_is_refused(mesh: Mesh) -> None:
    issued = await prefill(mesh, "replay", PROMPT_A)
    details = await refused(mesh, PROMPT_B, issued.first_token_id, issued.kv_handle)
    assert "issued for another prompt" in details
    # The same handle with its own prompt is genuine: the KV moves and is cached.
    received = await metric(only(mesh, "decode"), "kvmesh_kv_transfer_bytes_total")
    assert len(await decode(mesh, PROMPT_A, issued.first_token_id, issued.kv_handle)) == 3
    assert await metric(only(mesh, "decode"), "kvmesh_kv_transfer_bytes_total") > received


async def test_a_forged_handle_is_refused_and_the_mesh_serves_on(mesh: Mesh) -> None:
    issued = await prefill(mesh, "forged", PROMPT_B)
    forged = common_pb2.KvHandle()
    forged.CopyFrom(issued.kv_handle)
    forged.block_ids[0] = 0  # another request's block
    details = await refused(mesh, PROMPT_B, issued.first_token_id, forged)
    assert "forged or altered" in details
    with pytest.raises(grpc.aio.AioRpcError) as not_holder:  # a release without the token
        await release(mesh, issued.kv_handle, b"guessed-token")
    assert not_holder.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "held by another peer" in (not_holder.value.details() or "")
    assert await release(mesh, issued.kv_handle, issued.kv_handle.release_token)
    prefill_worker = only(mesh, "prefill")
    assert await metric(prefill_worker, "kvmesh_worker_leases_active") == 0
    issued = await prefill(mesh, "after", PROMPT_B)
    assert len(await decode(mesh, PROMPT_B, issued.first_token_id, issued.kv_handle)) == 3


async def test_watch_load_faster_than_its_minimum_is_refused(mesh: Mesh) -> None:
    async with to(mesh, "decode") as channel:
        stream = worker_pb2_grpc.WorkerStub(channel).WatchLoad(
            worker_pb2.WatchLoadRequest(interval_ms=5), timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stream:
                pass
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "at least 20" in (caught.value.details() or "")


async def test_a_read_racing_the_leases_expiry_is_not_used(mesh: Mesh) -> None:
    """A READ that ends in the last second of the lease (where the prefill worker, by its clock
    and a second of skew, may already have reused the blocks) is thrown away: the decode worker
    computes the prompt itself and answers as if it had never had a handle."""
    decode_worker = only(mesh, "decode")
    prompt = list(range(500, 564))
    issued = await prefill(mesh, "race", prompt, lease_ms=1500)
    expiry = issued.kv_handle.lease_expiry.ToMicroseconds() / 1e6
    # Into the race window: the behaviour under test is what happens there.
    await asyncio.sleep(max(0.0, expiry - time.time() - 0.7))
    received = await metric(decode_worker, "kvmesh_kv_transfer_bytes_total")
    raced = await handles_counted(decode_worker, "read_raced_expiry")
    tokens = await decode(mesh, prompt, issued.first_token_id, issued.kv_handle)
    assert await metric(decode_worker, "kvmesh_kv_transfer_bytes_total") > received  # it read
    assert await handles_counted(decode_worker, "read_raced_expiry") == raced + 1  # unused
    assert tokens == await decode(mesh, prompt, issued.first_token_id, None)  # computed here


async def handles_counted(child: Child, outcome: str) -> float:
    return total(
        await scrape(child.metrics_port),
        "kvmesh_kv_handles_total",
        containing=f'outcome="{outcome}"',
    )


async def test_a_prefill_sent_again_under_the_same_request_id_is_served(mesh: Mesh) -> None:
    """A router that dies after a Prefill leaves its export leased; the edge sends the request
    again, under the same id, through another router: the prefill worker serves it (each call
    has its own engine id) instead of refusing the id as in use. Found by killing a router
    during 20 streams (tests/e2e/test_router_ha.py)."""
    first = await prefill(mesh, "sent-again", PROMPT_A)
    second = await prefill(mesh, "sent-again", PROMPT_A)
    assert first.kv_handle.request_id != second.kv_handle.request_id
    assert first.kv_handle.request_id.startswith("sent-again#")
    assert await release(mesh, first.kv_handle, first.kv_handle.release_token)
    assert await release(mesh, second.kv_handle, second.kv_handle.release_token)
