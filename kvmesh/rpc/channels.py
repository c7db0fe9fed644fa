"""One way to open a client channel to a kvmesh service.

Channels get keepalive and message-size settings, a service config that retries only
idempotent unary methods on UNAVAILABLE (generation and other streams are never retried by the
channel: the router decides, because it knows what the client has already seen), optional
wait-for-ready, and an interceptor that forwards the caller's request id (from structlog's
contextvars) as `x-request-id` metadata, so logs of every hop share it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc
import structlog

from kvmesh.rpc.interceptors import REQUEST_ID_KEY
from kvmesh.rpc.server import MAX_MESSAGE_BYTES
from kvmesh.security import tls
from kvmesh.security.tls import TlsIdentity
from kvmesh.telemetry import tracing

# Unary methods that are safe to send twice.
IDEMPOTENT_METHODS: tuple[tuple[str, str], ...] = (
    ("grpc.health.v1.Health", "Check"),
    ("kvmesh.v1.Generation", "ListModels"),
    ("kvmesh.v1.KvTransfer", "GetAgentMetadata"),
    ("kvmesh.v1.KvTransfer", "ReleaseLease"),
    ("kvmesh.v1.KvTransfer", "GetTransferStats"),
    ("kvmesh.v1.Worker", "GetInfo"),
    ("kvmesh.v1.Worker", "GetKvSnapshot"),
    ("kvmesh.v1.Autoscaler", "GetPolicy"),
    ("kvmesh.v1.Autoscaler", "ListDecisions"),
    ("kvmesh.v1.ControlPlane", "ListClusters"),
    ("kvmesh.v1.ControlPlane", "ListWorkers"),
    ("kvmesh.v1.ControlPlane", "ListDeployments"),
    ("kvmesh.v1.ControlPlane", "ListEvents"),
)


def service_config(*, wait_for_ready: bool, idempotent: Sequence[tuple[str, str]]) -> str:
    retry = {
        "maxAttempts": 4,
        "initialBackoff": "0.05s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    configs: list[dict[str, Any]] = [
        {
            "name": [{"service": s, "method": m} for s, m in idempotent],
            "retryPolicy": retry,
            "waitForReady": wait_for_ready,
        },
        {"name": [{}], "waitForReady": wait_for_ready},  # everything else: no retries
    ]
    return json.dumps({"methodConfig": configs})


def open_channel(
    target: str,
    *,
    wait_for_ready: bool = True,
    idempotent: Sequence[tuple[str, str]] = IDEMPOTENT_METHODS,
    keepalive_time_s: float = 30.0,
    identity: TlsIdentity | None = None,
) -> grpc.aio.Channel:
    """A channel to `target` ("host:port"); close it with `await channel.close()`. With the
    process's TLS identity set (`kvmesh.security.tls`), or `identity` given, a mutual-TLS
    channel presenting it."""
    options: list[tuple[str, Any]] = [
        (
            "grpc.service_config",
            service_config(wait_for_ready=wait_for_ready, idempotent=idempotent),
        ),
        ("grpc.enable_retries", 1),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC's default reconnect backoff grows to 120 s: a peer back from an outage would
        # stay unreachable that long. Mesh peers are local; retry quickly.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    identity = identity or tls.current()
    if identity is not None:
        return grpc.aio.secure_channel(
            target,
            identity.channel_credentials(),
            options=options + identity.channel_options(),
            interceptors=_REQUEST_ID_INTERCEPTORS,
        )
    return grpc.aio.insecure_channel(target, options=options, interceptors=_REQUEST_ID_INTERCEPTORS)


def _with_request_id(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    """The call's metadata with the request id (from structlog's contextvars) and the trace
    context (`traceparent`) of the caller's current span."""
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    carrier: dict[str, str] = {}
    tracing.inject(carrier)
    if request_id is None and not carrier:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    if request_id is not None and REQUEST_ID_KEY not in metadata:
        metadata.add(REQUEST_ID_KEY, str(request_id))
    for key, value in carrier.items():
        if key not in metadata:
            metadata.add(key, value)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_request_id(details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_request_id(details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_request_id(details), requests)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_request_id(details), requests)


_REQUEST_ID_INTERCEPTORS: list[Any] = [
    _UnaryUnary(),
    _UnaryStream(),
    _StreamUnary(),
    _StreamStream(),
]
