"""One way to start a kvmesh gRPC server.

`RpcServer` adds what every service needs around its servicers: the health service (NOT_SERVING
until `set_serving(True)`, which a service calls after warm-up), reflection, the interceptor
(request ids, auth, error mapping, metrics), message-size and keepalive settings, and a graceful
stop on SIGTERM/SIGINT:

    NOT_SERVING -> stop hooks (deregister from discovery) -> grace for in-flight RPCs -> stop
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from kvmesh.rpc.interceptors import Authenticator, ServerInterceptor
from kvmesh.security import tls
from kvmesh.security.tls import TlsIdentity

log = structlog.get_logger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # what a service may send (KV snapshots are large)
# What each kind of service accepts from its callers: a bound on what one call can make it
# buffer, sized to its largest legitimate request.
RECEIVE_BYTES = {
    "router": 8 * 1024 * 1024,  # a long chat prompt as text
    "worker": 16 * 1024 * 1024,  # a long prompt and its generated tokens as token ids
    "admin": 1024 * 1024,  # the autoscaler's and control plane's small admin requests
}


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port; RpcServer.port tells which
    grace_s: float = 10.0  # how long in-flight RPCs may take to finish on stop
    max_message_bytes: int = MAX_MESSAGE_BYTES  # sent
    max_receive_bytes: int = 4 * 1024 * 1024  # accepted from a caller (gRPC's own default)
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    max_concurrent_rpcs: int | None = None


@dataclass(frozen=True, slots=True)
class ServiceBinding:
    """A servicer and how to add it to a server.

    `ServiceBinding("kvmesh.v1.Worker", lambda s: add_WorkerServicer_to_server(servicer, s))`
    """

    name: str  # the full service name, e.g. "kvmesh.v1.Worker"
    add_to_server: Callable[[grpc.aio.Server], None]


StopHook = Callable[[], Awaitable[None]]


class RpcServer:
    def __init__(
        self,
        services: Sequence[ServiceBinding],
        config: ServerConfig | None = None,
        *,
        authenticator: Authenticator | None = None,
        identity: TlsIdentity | None = None,
    ) -> None:
        """`identity`: serve mutual TLS with it, and authorize every call by the caller's role
        (default: the process's identity, `kvmesh.security.tls.current()`; None: plaintext)."""
        self.config = config or ServerConfig()
        self._services = list(services)
        self._health = health_aio.HealthServicer()
        self.identity = identity or tls.current()
        self._server = grpc.aio.server(
            interceptors=[ServerInterceptor(authenticator, roles=self.identity is not None)],
            options=_server_options(self.config),
            maximum_concurrent_rpcs=self.config.max_concurrent_rpcs,
        )
        self._stop_hooks: list[StopHook] = []
        self._stop_hooks_ran = False
        self._stopping: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def on_stop(self, hook: StopHook) -> None:
        """Run `hook` after health turns NOT_SERVING and before in-flight RPCs drain."""
        self._stop_hooks.append(hook)

    async def start(self) -> int:
        for binding in self._services:
            binding.add_to_server(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [b.name for b in self._services]
        names += [
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, self._server)
        address = f"{self.config.host}:{self.config.port}"
        if self.identity is not None:
            self.port = self._server.add_secure_port(address, self.identity.server_credentials())
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        log.info(
            "rpc server started",
            address=self.address,
            services=names[:-2],
            mtls=self.identity.role.value if self.identity else None,
        )
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        await self._set_all(status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop; safe to call more than once (later calls wait for the first)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace_s))
        await asyncio.shield(self._stopping)

    @property
    def stopping(self) -> bool:
        """A stop has begun (a signal, or `stop()`)."""
        return self._stopping is not None

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    def stop_on_signals(self) -> None:
        """SIGTERM and SIGINT start a graceful stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("stopping on signal", signal=sig.name)
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(None))

    async def run_stop_hooks(self) -> None:
        """Run the stop hooks now (a drain deregisters before in-flight work ends); once."""
        if self._stop_hooks_ran:
            return
        self._stop_hooks_ran = True
        for hook in self._stop_hooks:
            try:
                await hook()
            except Exception:
                log.exception("stop hook failed")

    async def _stop(self, grace_s: float | None) -> None:
        await self._health.enter_graceful_shutdown()
        await self.run_stop_hooks()
        grace = self.config.grace_s if grace_s is None else grace_s
        await self._server.stop(grace)
        log.info("rpc server stopped", address=self.address)

    async def _set_all(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        await self._health.set("", status)
        for binding in self._services:
            await self._health.set(binding.name, status)


def _server_options(config: ServerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_receive_bytes),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.so_reuseport", 0),
    ]
