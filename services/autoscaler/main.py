"""Wiring: command line -> discovery -> policy store, observer, tick loop -> servicer -> serve.

    python -m services.autoscaler --registry 127.0.0.1:8500 --port 0 --tick-s 5 \\
        --admin-token TOKEN     # or KVMESH_ADMIN_TOKEN

With an admin token every `Autoscaler` RPC needs `authorization: Bearer TOKEN`: policies change
how many GPUs a cluster holds, and decisions reveal its load, so reads are guarded as well as
writes. Without one the RPCs are open (development only) and a warning says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from dataclasses import dataclass

import structlog

from kvmesh import options
from kvmesh.api.v1 import autoscaler_pb2, autoscaler_pb2_grpc
from kvmesh.discovery import Discovery
from kvmesh.rpc import RpcServer, ServerConfig, ServiceBinding, admin_authenticator
from kvmesh.rpc.server import RECEIVE_BYTES
from kvmesh.rpc.service import ServiceSpec, run_service
from kvmesh.security.roles import Role
from services.autoscaler.loop import DEFAULT_TICK_S, AutoscalerLoop, DecisionLog
from services.autoscaler.observe import MeshObserver
from services.autoscaler.servicer import AutoscalerServicer
from services.autoscaler.store import PolicyStore

log = structlog.get_logger(__name__)

SERVICE_NAME = autoscaler_pb2.DESCRIPTOR.services_by_name["Autoscaler"].full_name
METHOD_PREFIX = f"/{SERVICE_NAME}/"  # every Autoscaler method

_SERVER = ServerConfig()


@dataclass(slots=True)
class AutoscalerConfig:
    host: str = _SERVER.host
    port: int = 50061
    registry: str | None = None  # None: CONSUL_HTTP_ADDR or 127.0.0.1:8500, and not registered
    tick_s: float = DEFAULT_TICK_S
    admin_token: str | None = None
    models: tuple[str, ...] = ()  # sized from the start, before any replica registers
    metrics_port: int | None = 0
    grace_s: float = 5.0


_DEFAULTS = AutoscalerConfig()


def parse(argv: list[str] | None = None) -> tuple[AutoscalerConfig, str]:
    """The config and the log level."""
    parser = argparse.ArgumentParser(prog="python -m services.autoscaler")
    options.add_server_options(parser, port=_DEFAULTS.port, grace_s=_DEFAULTS.grace_s)
    options.add_registry_options(parser)
    options.add_metrics_options(parser)
    options.add_logging_options(parser)
    parser.add_argument("--tick-s", type=float, default=_DEFAULTS.tick_s)
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("KVMESH_ADMIN_TOKEN") or None,
        help="bearer token every Autoscaler RPC needs (default: $KVMESH_ADMIN_TOKEN)",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="a model id (as workers register it) to size even while it has no replicas; repeat",
    )
    args = parser.parse_args(argv)
    options.configure_security(args, Role.AUTOSCALER)
    if args.tick_s <= 0:
        parser.error("--tick-s must be positive")
    config = AutoscalerConfig(
        host=args.host,
        port=args.port,
        registry=args.registry,
        tick_s=args.tick_s,
        admin_token=args.admin_token,
        models=tuple(args.model),
        metrics_port=options.metrics_port(args),
        grace_s=args.grace_s,
    )
    return config, args.log_level


async def run_autoscaler(config: AutoscalerConfig) -> None:
    discovery = Discovery(config.registry)
    decisions = DecisionLog()
    store = PolicyStore(discovery)
    observer = MeshObserver(discovery, models=config.models)
    loop = AutoscalerLoop(
        store, observer, decisions, discovery, pair_source=observer, tick_s=config.tick_s
    )
    servicer = AutoscalerServicer(store, decisions)
    binding = ServiceBinding(
        SERVICE_NAME,
        lambda server: autoscaler_pb2_grpc.add_AutoscalerServicer_to_server(servicer, server),
    )
    authenticator = admin_authenticator(config.admin_token, SERVICE_NAME)
    spec = ServiceSpec(
        role="autoscaler",
        services=[binding],
        server=ServerConfig(
            host=config.host,
            port=config.port,
            grace_s=config.grace_s,
            max_receive_bytes=RECEIVE_BYTES["admin"],
        ),
        registry=config.registry,
        tags=["role=autoscaler"],
        metrics_port=config.metrics_port,
        authenticator=authenticator,
    )

    def serving(server: RpcServer, metrics_port: int | None) -> None:
        print(f"autoscaler serving {server.address} metrics_port={metrics_port}", flush=True)

    ticking = asyncio.create_task(loop.run(), name="autoscaler-loop")
    try:
        await run_service(spec, on_serving=serving)
    finally:
        ticking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticking
        await observer.close()
        await discovery.close()
