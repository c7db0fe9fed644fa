"""Mutual TLS and role authorization on a real `RpcServer` on 127.0.0.1: who completes the
handshake, who may call what, and what the refusals say."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.api.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.rpc import ServiceBinding
from kvmesh.rpc.auth import TokenAuthenticator, bearer
from kvmesh.rpc.channels import open_channel
from kvmesh.rpc.server import RpcServer
from kvmesh.security import certs, tls
from kvmesh.security.roles import Role
from kvmesh.security.tls import TlsIdentity
from tests.integration.rpc.sample_service import SampleWorker


class Transfer(worker_pb2_grpc.KvTransferServicer):
    async def GetAgentMetadata(self, request: Any, context: Any) -> Any:
        return worker_pb2.GetAgentMetadataResponse(agent_name="prefill-agent")


@pytest.fixture(scope="module")
def tls_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    mine, other = tmp_path_factory.mktemp("tls"), tmp_path_factory.mktemp("other-ca")
    certs.init(mine)
    certs.init(other)
    return mine, other


@pytest.fixture
async def server(tls_dirs: tuple[Path, Path]) -> AsyncIterator[RpcServer]:
    worker = SampleWorker("w1")
    services = [
        ServiceBinding(
            "kvmesh.v1.Worker", lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(worker, s)
        ),
        ServiceBinding(
            "kvmesh.v1.KvTransfer",
            lambda s: worker_pb2_grpc.add_KvTransferServicer_to_server(Transfer(), s),
        ),
    ]
    rpc = RpcServer(
        services,
        identity=TlsIdentity.load(tls_dirs[0], Role.PREFILL),
        authenticator=TokenAuthenticator("s3cret", ["/kvmesh.v1.Worker/Drain"]),
    )
    await rpc.start()
    await rpc.set_serving(True)
    yield rpc
    await rpc.stop(0)


@pytest.fixture(autouse=True)
def _plaintext_after() -> Iterator[None]:
    yield
    tls.use(None)  # the process identity is global: leave none behind


def as_role(directory: Path, role: Role | None, address: str) -> grpc.aio.Channel:
    tls.use(TlsIdentity.load(directory, role) if role else None)
    return open_channel(address, wait_for_ready=False)


async def test_a_plaintext_client_fails_its_handshake(server: RpcServer) -> None:
    async with as_role(Path(), None, server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_from_another_ca_fails_its_handshake(
    server: RpcServer, tls_dirs: tuple[Path, Path]
) -> None:
    async with as_role(tls_dirs[1], Role.DECODE, server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await worker_pb2_grpc.KvTransferStub(channel).GetAgentMetadata(
                worker_pb2.GetAgentMetadataRequest(), timeout=5
            )
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_roles_are_authorized_per_method(
    server: RpcServer, tls_dirs: tuple[Path, Path]
) -> None:
    async with as_role(tls_dirs[0], Role.DECODE, server.address) as channel:
        meta = await worker_pb2_grpc.KvTransferStub(channel).GetAgentMetadata(
            worker_pb2.GetAgentMetadataRequest(), timeout=5
        )
        assert meta.agent_name == "prefill-agent"
    async with as_role(tls_dirs[0], Role.EDGE, server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await worker_pb2_grpc.KvTransferStub(channel).GetAgentMetadata(
                worker_pb2.GetAgentMetadataRequest(), timeout=5
            )
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "needs the decode role" in (caught.value.details() or "")
        assert "called by the edge identity" in (caught.value.details() or "")
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # health stays open


async def test_drain_needs_the_admin_identity_and_still_its_token(
    server: RpcServer, tls_dirs: tuple[Path, Path]
) -> None:
    request = worker_pb2.DrainRequest(timeout_ms=1)
    async with as_role(tls_dirs[0], Role.ROUTER, server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await worker_pb2_grpc.WorkerStub(channel).Drain(
                request, metadata=bearer("s3cret"), timeout=5
            )
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    async with as_role(tls_dirs[0], Role.ADMIN, server.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Drain(request, timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        response = await stub.Drain(request, metadata=bearer("s3cret"), timeout=5)
        assert response.drained
