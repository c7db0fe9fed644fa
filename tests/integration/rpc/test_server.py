"""The gRPC server bootstrap in-process: health, reflection, errors, request ids, auth, retries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import structlog
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from kvmesh.api.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.rpc import RpcServer, ServerConfig, TokenAuthenticator, bearer, open_channel
from kvmesh.rpc.errors import InvalidArgumentError, from_rpc_error
from kvmesh.telemetry import metrics
from tests.integration.rpc.sample_service import WORKER_SERVICE, SampleWorker, binding


@pytest.fixture
async def server() -> AsyncIterator[RpcServer]:
    srv = RpcServer([binding(SampleWorker("w1"))], ServerConfig(grace_s=5))
    await srv.start()
    yield srv
    await srv.stop(0)


@pytest.fixture
async def channel(server: RpcServer) -> AsyncIterator[grpc.aio.Channel]:
    ch = open_channel(server.address)
    yield ch
    await ch.close()


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_health_is_not_serving_until_warmed_up(server: RpcServer, channel: Any) -> None:
    assert await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await _health(channel, WORKER_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    await server.set_serving(True)
    assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert await _health(channel, WORKER_SERVICE) == health_pb2.HealthCheckResponse.SERVING


def _reflect_and_check(address: str) -> tuple[list[str], list[str], int]:
    """Find the services and Health/Check through reflection alone, then call it generically."""
    with grpc.insecure_channel(address) as ch:
        database = ProtoReflectionDescriptorDatabase(ch)
        services = database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        worker = pool.FindServiceByName("kvmesh.v1.Worker")
        check = pool.FindServiceByName("grpc.health.v1.Health").FindMethodByName("Check")
        request_cls = message_factory.GetMessageClass(check.input_type)
        response_cls = message_factory.GetMessageClass(check.output_type)
        call = ch.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        response = call(request_cls(service=""))
        return list(services), [m.name for m in worker.methods], int(response.status)


async def test_reflection_lists_methods_and_calls_health_check(server: RpcServer) -> None:
    await server.set_serving(True)
    services, worker_methods, status = await asyncio.to_thread(_reflect_and_check, server.address)
    assert {"kvmesh.v1.Worker", "grpc.health.v1.Health"} <= set(services)
    assert {"GetInfo", "WatchKvEvents", "GetKvSnapshot", "WatchLoad", "Drain"} <= set(
        worker_methods
    )
    assert status == health_pb2.HealthCheckResponse.SERVING


async def test_package_errors_become_status_codes(channel: Any) -> None:
    stub = worker_pb2_grpc.WorkerStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.GetKvSnapshot(worker_pb2.GetKvSnapshotRequest())
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not served by the sample worker" in (failure.value.details() or "")
    error = from_rpc_error(failure.value)
    assert isinstance(error, InvalidArgumentError)
    assert not error.retryable


async def test_unexpected_errors_are_internal_without_leaking_details(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(self: Any, request: Any, context: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(SampleWorker, "GetInfo", broken)
    srv = RpcServer([binding(SampleWorker("w"))])
    await srv.start()
    ch = open_channel(srv.address)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await worker_pb2_grpc.WorkerStub(ch).GetInfo(worker_pb2.GetInfoRequest())
        assert failure.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in (failure.value.details() or "")
    finally:
        await ch.close()
        await srv.stop(0)


async def test_request_id_travels_in_metadata_and_counts_are_kept(channel: Any) -> None:
    before = metrics.RPC_SERVER_HANDLED.labels("kvmesh.v1.Worker", "GetInfo", "OK")._value.get()
    with structlog.contextvars.bound_contextvars(request_id="req-123"):
        call = worker_pb2_grpc.WorkerStub(channel).GetInfo(worker_pb2.GetInfoRequest())
        info = await call
    assert info.worker_id == "w1"
    trailing = dict(await call.trailing_metadata())
    assert trailing["x-request-id"] == "req-123"
    after = metrics.RPC_SERVER_HANDLED.labels("kvmesh.v1.Worker", "GetInfo", "OK")._value.get()
    assert after == before + 1


async def test_auth_hook_guards_selected_methods() -> None:
    auth = TokenAuthenticator("s3cret", ["/kvmesh.v1.Worker/Drain"])
    srv = RpcServer([binding(SampleWorker("w"))], authenticator=auth)
    await srv.start()
    ch = open_channel(srv.address)
    try:
        stub = worker_pb2_grpc.WorkerStub(ch)
        assert (await stub.GetInfo(worker_pb2.GetInfoRequest())).worker_id == "w"
        for metadata in [(), bearer("wrong")]:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.Drain(worker_pb2.DrainRequest(), metadata=metadata)
            assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await stub.Drain(worker_pb2.DrainRequest(), metadata=bearer("s3cret"))).drained
        assert await _health(ch) == health_pb2.HealthCheckResponse.NOT_SERVING  # health is open
    finally:
        await ch.close()
        await srv.stop(0)


async def test_channel_retries_only_idempotent_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    failures = {"GetInfo": 1, "Drain": 1}

    async def flaky(name: str, context: Any) -> None:
        if failures[name] > 0:
            failures[name] -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")

    original_info, original_drain = SampleWorker.GetInfo, SampleWorker.Drain

    async def get_info(self: Any, request: Any, context: Any) -> Any:
        await flaky("GetInfo", context)
        return await original_info(self, request, context)

    async def drain(self: Any, request: Any, context: Any) -> Any:
        await flaky("Drain", context)
        return await original_drain(self, request, context)

    monkeypatch.setattr(SampleWorker, "GetInfo", get_info)
    monkeypatch.setattr(SampleWorker, "Drain", drain)
    srv = RpcServer([binding(SampleWorker("w"))])
    await srv.start()
    ch = open_channel(srv.address)
    try:
        stub = worker_pb2_grpc.WorkerStub(ch)
        assert (await stub.GetInfo(worker_pb2.GetInfoRequest())).worker_id == "w"  # retried
        with pytest.raises(grpc.aio.AioRpcError) as failure:  # not idempotent: not retried
            await stub.Drain(worker_pb2.DrainRequest())
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await ch.close()
        await srv.stop(0)


async def test_graceful_stop_lets_in_flight_rpcs_finish() -> None:
    servicer = SampleWorker("w")
    srv = RpcServer([binding(servicer)])
    await srv.start()
    await srv.set_serving(True)
    ch = open_channel(srv.address)
    hook_ran = asyncio.Event()

    async def hook() -> None:
        hook_ran.set()

    srv.on_stop(hook)
    try:
        stub = worker_pb2_grpc.WorkerStub(ch)
        in_flight = asyncio.ensure_future(stub.Drain(worker_pb2.DrainRequest(timeout_ms=700)))
        await servicer.draining.wait()
        await srv.stop(5)
        assert hook_ran.is_set()
        assert (await in_flight).drained
    finally:
        await ch.close()
