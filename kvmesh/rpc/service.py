"""One way to run a kvmesh service process: serve, warm up, register, stop gracefully.

    start the /metrics endpoint and the gRPC server (health NOT_SERVING)
    -> warm up (load a model, connect to peers)
    -> health SERVING -> register in discovery (heartbeat)
    ... SIGTERM / SIGINT:
    -> health NOT_SERVING -> deregister -> grace for in-flight RPCs -> stop

Every service's `__main__` builds a `ServiceSpec` and awaits `run_service`.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from kvmesh.discovery import Discovery, Registrar, Registration
from kvmesh.rpc.interceptors import Authenticator
from kvmesh.rpc.server import RpcServer, ServerConfig, ServiceBinding
from kvmesh.telemetry.http import start_metrics_server

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class ServiceSpec:
    role: str  # registered in discovery as kvmesh-<role>
    services: Sequence[ServiceBinding]
    server: ServerConfig = field(default_factory=ServerConfig)
    registry: str | None = None  # Consul / embedded registry address; None: do not register
    tags: Sequence[str] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    ttl_s: float | None = 2.0  # TTL check with heartbeats; None: a gRPC check by the registry
    grpc_check_interval_s: float = 1.0
    deregister_critical_after_s: float = 10.0
    metrics_port: int | None = 0  # 0: any free port; None: no /metrics endpoint
    authenticator: Authenticator | None = None

    @property
    def consul_name(self) -> str:
        return f"kvmesh-{self.role}"


def registration_for(spec: ServiceSpec, port: int, metrics_port: int | None = None) -> Registration:
    """Meta gets `metrics_port` when the service serves /metrics (the autoscaler scrapes it)."""
    host = spec.server.host
    service_id = f"{spec.consul_name}-{socket.gethostname()}-{host}-{port}"
    return Registration(
        name=spec.consul_name,
        service_id=service_id,
        address=host,
        port=port,
        tags=tuple(spec.tags),
        meta=dict(spec.meta) | ({"metrics_port": str(metrics_port)} if metrics_port else {}),
        ttl_s=spec.ttl_s,
        grpc_check_interval_s=None if spec.ttl_s is not None else spec.grpc_check_interval_s,
        deregister_critical_after_s=spec.deregister_critical_after_s,
    )


async def run_service(
    spec: ServiceSpec,
    *,
    warm_up: Callable[[], Awaitable[None]] | None = None,
    on_serving: Callable[[RpcServer, int | None], None] | None = None,
) -> None:
    """Serve until SIGTERM / SIGINT, then stop gracefully.

    `on_serving(server, metrics_port)` runs once the service is registered (processes print
    their ready line there).
    """
    metrics = None
    if spec.metrics_port is not None:  # on the gRPC host: the registered address serves both
        metrics = start_metrics_server(spec.metrics_port, spec.server.host)
    server = RpcServer(spec.services, spec.server, authenticator=spec.authenticator)
    server.stop_on_signals()
    port = await server.start()
    discovery: Discovery | None = None
    try:
        if warm_up is not None:
            await warm_up()
        if server.stopping:  # a signal came during warm-up: never register, never serve
            await server.wait_for_termination()
            return
        await server.set_serving(True)
        if spec.registry is not None:
            discovery = Discovery(spec.registry)
            registration = registration_for(spec, port, metrics.port if metrics else None)
            registrar = Registrar(discovery, registration)
            await registrar.start()
            server.on_stop(registrar.stop)
        log.info(
            "serving",
            role=spec.role,
            address=server.address,
            metrics_port=metrics.port if metrics else None,
        )
        if on_serving is not None:
            on_serving(server, metrics.port if metrics else None)
        await server.wait_for_termination()
    finally:
        await server.stop()
        if discovery is not None:
            await discovery.close()
        if metrics is not None:
            metrics.stop()
