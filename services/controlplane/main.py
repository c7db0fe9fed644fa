"""Wiring: command line -> discovery, one actuator per cluster -> reconcile loop -> admin RPCs.

    python -m services.controlplane --registry 127.0.0.1:8500 \\
        --cluster us-east=127.0.0.1:8500 --cluster eu-west=127.0.0.1:8501 \\
        --model smollm2 --capacity 4 --admin-token TOKEN

Each `--cluster NAME=AGENT` is a Consul datacenter and the agent its workers register with; with
none, the registry's own datacenter is the only cluster. `--actuator local` (the default) starts
workers as processes on this machine; `--actuator kubernetes` scales one Deployment per
(model, tier) in `--namespace` of each cluster's kubeconfig context (`--kube-context NAME=CTX`).
With an admin token every `ControlPlane` RPC needs `authorization: Bearer TOKEN`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from kvmesh import models, options
from kvmesh.api.v1 import controlplane_pb2, controlplane_pb2_grpc
from kvmesh.discovery import Discovery
from kvmesh.rpc import RpcServer, ServerConfig, ServiceBinding, admin_authenticator
from kvmesh.rpc.server import RECEIVE_BYTES
from kvmesh.rpc.service import ServiceSpec, run_service
from kvmesh.security.roles import Role
from services.controlplane.actuator import Actuator
from services.controlplane.local import LocalActuator
from services.controlplane.plane import DEFAULT_DRAIN_TIMEOUT_S, DEFAULT_INTERVAL_S, ControlPlane
from services.controlplane.servicer import ControlPlaneServicer

log = structlog.get_logger(__name__)

SERVICE_NAME = controlplane_pb2.DESCRIPTOR.services_by_name["ControlPlane"].full_name
ACTUATORS = ("local", "kubernetes")

_SERVER = ServerConfig()


@dataclass(slots=True)
class ControlPlaneConfig:
    host: str = _SERVER.host
    port: int = 50071
    registry: str | None = None
    clusters: dict[str, str] = field(default_factory=dict)  # name -> agent address
    models: tuple[str, ...] = ("smollm2",)
    capacity: int = 4
    actuator: str = "local"
    namespace: str = "kvmesh"
    kube_contexts: dict[str, str] = field(default_factory=dict)  # cluster -> kubeconfig context
    device: str = "cpu"
    log_dir: Path = field(default_factory=lambda: Path(".kvmesh/logs"))
    worker_args: tuple[str, ...] = ()
    interval_s: float = DEFAULT_INTERVAL_S
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    admin_token: str | None = None
    metrics_port: int | None = 0
    grace_s: float = 5.0


_DEFAULTS = ControlPlaneConfig()


def parse(argv: list[str] | None = None) -> tuple[ControlPlaneConfig, str]:
    """The config and the log level."""
    parser = argparse.ArgumentParser(prog="python -m services.controlplane")
    options.add_server_options(parser, port=_DEFAULTS.port, grace_s=_DEFAULTS.grace_s)
    options.add_registry_options(parser)
    options.add_metrics_options(parser)
    options.add_logging_options(parser)
    parser.add_argument(
        "--cluster",
        action="append",
        default=[],
        metavar="NAME=AGENT",
        help="a cluster (Consul datacenter) and its agent's host:port; repeat",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="a model spec workers may be started with; repeat "
        f"(default: {', '.join(_DEFAULTS.models)})",
    )
    parser.add_argument(
        "--capacity", type=int, default=_DEFAULTS.capacity, help="replicas one cluster may hold"
    )
    parser.add_argument("--actuator", choices=ACTUATORS, default=_DEFAULTS.actuator)
    parser.add_argument(
        "--namespace", default=_DEFAULTS.namespace, help="kubernetes: the namespace"
    )
    parser.add_argument(
        "--kube-context",
        action="append",
        default=[],
        metavar="CLUSTER=CONTEXT",
        help="kubernetes: the kubeconfig context of a cluster (default: in-cluster / current)",
    )
    parser.add_argument("--device", default=_DEFAULTS.device, help="local: the workers' --device")
    parser.add_argument("--log-dir", type=Path, default=_DEFAULTS.log_dir)
    parser.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help="local: one more argument for every worker (--worker-arg=--num-blocks ...)",
    )
    parser.add_argument("--interval-s", type=float, default=_DEFAULTS.interval_s)
    parser.add_argument("--drain-timeout-s", type=float, default=_DEFAULTS.drain_timeout_s)
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("KVMESH_ADMIN_TOKEN") or None,
        help="bearer token every ControlPlane RPC needs (default: $KVMESH_ADMIN_TOKEN)",
    )
    args = parser.parse_args(argv)
    options.configure_security(args, Role.CONTROLPLANE)
    if args.interval_s <= 0 or args.drain_timeout_s <= 0:
        parser.error("--interval-s and --drain-timeout-s must be positive")
    if args.capacity < 0:
        parser.error("--capacity must not be negative")
    config = ControlPlaneConfig(
        host=args.host,
        port=args.port,
        registry=args.registry,
        clusters=_pairs(parser, "--cluster", args.cluster),
        models=tuple(args.model) or _DEFAULTS.models,
        capacity=args.capacity,
        actuator=args.actuator,
        namespace=args.namespace,
        kube_contexts=_pairs(parser, "--kube-context", args.kube_context),
        device=args.device,
        log_dir=args.log_dir,
        worker_args=tuple(args.worker_arg),
        interval_s=args.interval_s,
        drain_timeout_s=args.drain_timeout_s,
        admin_token=args.admin_token,
        metrics_port=options.metrics_port(args),
        grace_s=args.grace_s,
    )
    return config, args.log_level


def _pairs(parser: argparse.ArgumentParser, flag: str, values: list[str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, target = value.partition("=")
        if not sep or not name or not target:
            parser.error(f"{flag} takes NAME=VALUE, not {value!r}")
        if name in pairs:
            parser.error(f"{flag} {name} is given twice")
        pairs[name] = target
    return pairs


async def build_actuators(config: ControlPlaneConfig, discovery: Discovery) -> dict[str, Actuator]:
    clusters = dict(config.clusters)
    if not clusters:
        clusters[await discovery.local_datacenter()] = discovery.address
    if config.actuator == "kubernetes":
        from kubernetes import config as kube_config  # only needed with this actuator

        from services.controlplane.kubernetes import KubernetesActuator

        actuators: dict[str, Actuator] = {}
        for name in clusters:
            context = config.kube_contexts.get(name)
            client = kube_config.new_client_from_config(context=context) if context else None  # type: ignore[no-untyped-call]
            actuators[name] = KubernetesActuator(
                name, namespace=config.namespace, capacity=config.capacity, api_client=client
            )
        return actuators
    sources = [await asyncio.to_thread(models.resolve, spec) for spec in config.models]
    specs = {source.model_id: spec for source, spec in zip(sources, config.models, strict=True)}
    return {
        name: LocalActuator(
            name,
            registry=agent,
            models=specs,
            capacity=config.capacity,
            log_dir=config.log_dir,
            worker_args=config.worker_args,
            device=config.device,
            host=config.host,
        )
        for name, agent in clusters.items()
    }


async def run_controlplane(config: ControlPlaneConfig) -> None:
    discovery = Discovery(config.registry)
    try:
        actuators = await build_actuators(config, discovery)
    except BaseException:
        await discovery.close()
        raise
    plane = ControlPlane(
        discovery, actuators, interval_s=config.interval_s, drain_timeout_s=config.drain_timeout_s
    )
    servicer = ControlPlaneServicer(plane)
    binding = ServiceBinding(
        SERVICE_NAME,
        lambda server: controlplane_pb2_grpc.add_ControlPlaneServicer_to_server(servicer, server),
    )
    authenticator = admin_authenticator(config.admin_token, SERVICE_NAME)
    spec = ServiceSpec(
        role="controlplane",
        services=[binding],
        server=ServerConfig(
            host=config.host,
            port=config.port,
            grace_s=config.grace_s,
            max_receive_bytes=RECEIVE_BYTES["admin"],
        ),
        registry=config.registry,
        tags=["role=controlplane"],
        metrics_port=config.metrics_port,
        authenticator=authenticator,
    )

    def serving(server: RpcServer, metrics_port: int | None) -> None:
        clusters = ",".join(sorted(actuators))
        print(
            f"controlplane serving {server.address} metrics_port={metrics_port} "
            f"clusters={clusters}",
            flush=True,
        )

    reconciling = asyncio.create_task(plane.run(), name="controlplane-loop")
    try:
        await run_service(spec, on_serving=serving)
    finally:
        reconciling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reconciling
        await plane.close()  # stops the local actuators' workers
        await discovery.close()
