"""What every kvmesh RPC goes through on the server, in one wrapper per method.

For each call: the request id (from `x-request-id` metadata, or a new one) is bound into
structlog's contextvars and echoed in the trailing metadata; on a mutual-TLS server the
caller's role must be allowed the method (`kvmesh.security.authz`); the authenticator (if any,
for admin tokens) runs;
exceptions become the status codes of `kvmesh.rpc.errors`; latency and status are counted.
Wrapping each method's handler once is cheaper than a chain of interceptors.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

import grpc
import structlog
from opentelemetry.trace import Status, StatusCode

from kvmesh.rpc.errors import status_of
from kvmesh.security import authz
from kvmesh.security.tls import peer_role
from kvmesh.telemetry import metrics, tracing

log = structlog.get_logger(__name__)

REQUEST_ID_KEY = "x-request-id"


class Authenticator(Protocol):
    def authenticate(self, method: str, metadata: Mapping[str, str]) -> None:
        """Raise AuthenticationError / AuthorizationError to refuse the call."""
        ...


class _Guard:
    """What a call must pass before its handler runs: the caller's role may call the method
    (mutual-TLS servers, `kvmesh.security.authz`), and the authenticator (admin tokens)."""

    def __init__(self, authenticator: Authenticator | None, roles: bool) -> None:
        self.authenticator = authenticator
        self.roles = roles

    def check(
        self, method: str, metadata: Mapping[str, str], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if self.roles:
            authz.authorize(method, peer_role(context))
        if self.authenticator is not None:
            self.authenticator.authenticate(method, metadata)


class ServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, authenticator: Authenticator | None = None, *, roles: bool = False) -> None:
        """`roles`: authorize every call by the caller's role (servers with mutual TLS)."""
        self._guard = _Guard(authenticator, roles)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None:
            return handler
        return _wrap(handler, details.method, self._guard)


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, guard: _Guard
) -> grpc.RpcMethodHandler[Any, Any]:
    service, _, name = method.lstrip("/").partition("/")
    guarded = None if authz.is_open(method) else guard
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    # grpc's stubs type handlers as synchronous; these are grpc.aio coroutine functions.
    h: Any = handler
    if h.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _unary(h.unary_unary, service, name, guarded), **kwargs
        )
    if h.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(h.unary_stream, service, name, guarded), **kwargs
        )
    if h.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _unary(h.stream_unary, service, name, guarded), **kwargs
        )
    return grpc.stream_stream_rpc_method_handler(
        _streaming(h.stream_stream, service, name, guarded), **kwargs
    )


class _Call:
    """Per-call bookkeeping shared by the unary and streaming wrappers."""

    def __init__(
        self, service: str, name: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        self.service, self.name, self.context = service, name, context
        self.metadata = {
            k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)
        }
        self.request_id = self.metadata.get(REQUEST_ID_KEY) or uuid.uuid4().hex
        self.started = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.bound = structlog.contextvars.bound_contextvars(
            request_id=self.request_id, rpc=f"{service}/{name}"
        )
        self.span = tracing.server_span(
            f"{service}/{name}",
            self.metadata,
            {
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": name,
                "kvmesh.request_id": self.request_id,
            },
        )

    def __enter__(self) -> _Call:
        self.current_span = self.span.__enter__()
        self.bound.__enter__()
        self.context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bound.__exit__(*exc)
        self.current_span.set_attribute("rpc.grpc.status_code", self.code.value[0])
        if self.code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
            self.current_span.set_status(Status(StatusCode.ERROR, self.code.name))
        self.span.__exit__(*exc)
        metrics.RPC_SERVER_HANDLED.labels(self.service, self.name, self.code.name).inc()
        metrics.RPC_SERVER_HANDLING_SECONDS.labels(self.service, self.name).observe(
            time.perf_counter() - self.started
        )

    def authenticate(self, guard: _Guard | None) -> None:
        if guard is not None:
            guard.check(f"/{self.service}/{self.name}", self.metadata, self.context)

    async def fail(self, exc: BaseException) -> None:
        """Turn an exception into the call's status; always raises."""
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):  # the client went away
            self.code = grpc.StatusCode.CANCELLED
            raise exc
        if isinstance(exc, grpc.aio.AbortError):  # the handler aborted with its own status
            aborted = self.context.code()
            self.code = aborted if isinstance(aborted, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
            raise exc
        code = status_of(exc)
        if code is None:  # a bug: log it, tell the caller only what it can use
            log.exception("unexpected error in RPC handler")
            self.code = grpc.StatusCode.INTERNAL
            await self.context.abort(
                grpc.StatusCode.INTERNAL, f"internal error (request id {self.request_id})"
            )
        self.code = code
        await self.context.abort(code, str(exc) or code.name)


def _unary(
    behavior: Callable[..., Awaitable[Any]],
    service: str,
    name: str,
    guard: _Guard | None,
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        with _Call(service, name, context) as rpc:
            try:
                rpc.authenticate(guard)
                return await behavior(request, context)
            except BaseException as e:
                await rpc.fail(e)

    return call


def _streaming(
    behavior: Callable[..., Any],
    service: str,
    name: str,
    guard: _Guard | None,
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        with _Call(service, name, context) as rpc:
            try:
                rpc.authenticate(guard)
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        yield response
                else:  # a handler that writes with context.write()
                    await result
            except BaseException as e:
                await rpc.fail(e)

    return call
