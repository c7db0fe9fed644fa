"""What a worker process is: an engine, a NIXL transfer agent, leases, and its gRPC services.

`run_worker(config, tier_binding)` is the main loop of both `services.prefill` and
`services.decode`; each adds the one service that makes it what it is (`Prefill`, `Decode`).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
from prometheus_client import REGISTRY

from kvmesh import options
from kvmesh.api.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.discovery import Discovery
from kvmesh.engine import Engine, EngineConfig, create_engine
from kvmesh.errors import InvalidRequestError, ModelLoadError, StoppedError
from kvmesh.rpc import RpcServer, ServerConfig, ServiceBinding
from kvmesh.rpc.errors import FailedPreconditionError
from kvmesh.rpc.server import RECEIVE_BYTES
from kvmesh.rpc.service import ServiceSpec, run_service
from kvmesh.security.handles import META_KEY as HANDLE_KEY_META
from kvmesh.security.handles import HandleSigner
from kvmesh.security.roles import Role
from kvmesh.telemetry import configure_logging, metrics
from kvmesh.tiers import Tier
from kvmesh.types import TransferMode
from kvmesh.worker.handle_keys import HandleKeys
from kvmesh.worker.leases import LeaseTable
from kvmesh.worker.servicers import KvTransferServicer, WorkerServicer

if TYPE_CHECKING:
    from kvmesh.kv.transfer.agent import KvTransferAgent

log = structlog.get_logger(__name__)


_SERVER = ServerConfig()


@dataclass(slots=True)
class WorkerConfig:
    tier: Tier
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = _SERVER.host
    port: int = 0
    grace_s: float = _SERVER.grace_s
    registry: str | None = None
    worker_id: str = ""
    lease_s: float = 30.0
    ttl_s: float = 2.0
    metrics_port: int | None = 0
    kv_events: bool = True  # publish KV events for routers' prefix indexes


_DEFAULTS = WorkerConfig(tier=Tier.PREFILL)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_engine_options(parser)
    options.add_server_options(parser, port=0)
    options.add_registry_options(parser)
    options.add_metrics_options(parser)
    options.add_logging_options(parser)
    worker = parser.add_argument_group("worker")
    worker.add_argument("--worker-id", default=_DEFAULTS.worker_id, help="default: generated")
    worker.add_argument(
        "--lease-s", type=float, default=_DEFAULTS.lease_s, help="how long exported KV stays pinned"
    )
    worker.add_argument("--ttl-s", type=float, default=_DEFAULTS.ttl_s, help="discovery TTL check")
    worker.add_argument(
        "--no-kv-events",
        dest="kv_events",
        action="store_false",
        help="publish no KV events: routers index this worker approximately",
    )


def config_from_arguments(tier: Tier, args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        tier=tier,
        engine=options.engine_config(args),
        host=args.host,
        port=args.port,
        grace_s=args.grace_s,
        registry=args.registry,
        worker_id=args.worker_id,
        lease_s=args.lease_s,
        ttl_s=args.ttl_s,
        metrics_port=options.metrics_port(args),
        kv_events=args.kv_events,
    )


class WorkerRuntime:
    """Owns the engine and what hangs off it; built before serving, warmed up in `start`."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.worker_id = config.worker_id or f"{config.tier}-{uuid.uuid4().hex[:8]}"
        self._engine: Engine | None = None
        self._transfer: KvTransferAgent | None = None
        self._leases: LeaseTable | None = None
        self.server: RpcServer | None = None
        self.draining = False
        self.handle_signer = HandleSigner()  # signs the KV handles this worker issues
        self.handle_keys: HandleKeys | None = None  # finds the keys of the handles it is given

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise StoppedError("the worker is still warming up")
        return self._engine

    @property
    def transfer_mode(self) -> TransferMode:
        return self.engine.info.transfer_mode

    @property
    def transfer(self) -> KvTransferAgent:
        """kvmesh's NIXL agent over the engine's KV (TransferMode.MESH only)."""
        if self._transfer is None:
            if self._engine is not None and self.transfer_mode is TransferMode.ENGINE:
                raise FailedPreconditionError(
                    f"engine {self._engine.info.engine!r} moves its own KV: this worker has no "
                    "NIXL agent"
                )
            raise StoppedError("the worker is still warming up")
        return self._transfer

    @property
    def leases(self) -> LeaseTable:
        if self._leases is None:
            raise StoppedError("the worker is still warming up")
        return self._leases

    async def start(self, spec: ServiceSpec) -> None:
        """Build and start the engine; with TransferMode.MESH register its KV with NIXL; start
        leases; fill discovery meta."""
        engine = await asyncio.to_thread(create_engine, self.config.engine)
        await engine.start()
        self._engine = engine
        notifications = None
        if engine.info.transfer_mode is TransferMode.MESH:
            region = engine.kv_region()
            if region is None:
                raise FailedPreconditionError(
                    f"engine {engine.info.engine!r} declares TransferMode.MESH but exposes no "
                    "KV region"
                )
            from kvmesh.kv.transfer.agent import KvTransferAgent

            self._transfer = KvTransferAgent(
                self.worker_id, region, export_cache=engine.export_region()
            )
            notifications = self._transfer.take_notifications
        self._leases = LeaseTable(engine.release_export, take_notifications=notifications)
        self._leases.start()
        REGISTRY.register(metrics.EngineCollector(engine, self.config.tier))
        info = engine.info
        spec.tags = [f"model={info.model_id}", f"role={self.config.tier}"]
        spec.meta = {
            "worker_id": self.worker_id,
            "model": info.model_id,
            "block_size": str(info.block_size),
            "layout": info.layout_fingerprint,
            "engine": info.engine,
            "transfer_mode": info.transfer_mode.value,
            "attention_backend": info.attention_backend,
            "kv_dtype": info.kv_dtype,
            "nixl_agent": self.worker_id if self._transfer is not None else "",
            "max_model_len": str(info.max_model_len),
            HANDLE_KEY_META: self.handle_signer.public_key,
        }
        if self.config.registry is not None:
            self.handle_keys = HandleKeys(Discovery(self.config.registry))

    async def stop(self) -> None:
        if self._leases is not None:
            await self._leases.stop()
        if self._engine is not None:
            await self._engine.stop()
        if self._transfer is not None:
            self._transfer.close()
        if self.handle_keys is not None:
            await self.handle_keys.close()

    def info(self) -> worker_pb2.WorkerInfo:
        info = self.engine.info
        return worker_pb2.WorkerInfo(
            worker_id=self.worker_id,
            tier=self.config.tier.to_proto(),
            model=info.model_id,
            block_size=info.block_size,
            num_blocks=info.num_blocks,
            layout_fingerprint=info.layout_fingerprint,
            max_model_len=info.max_model_len,
            engine=info.engine,
            device=info.device,
            nixl_agent=self.worker_id if self._transfer is not None else "",
            vocab_size=info.vocab_size,
            grpc_address=self.server.address if self.server else "",
        )

    async def drain(self, timeout_s: float) -> int:
        """Stop taking work (NOT_SERVING, deregistered) and wait for what is in flight."""
        self.draining = True
        if self.server is not None:
            await self.server.set_serving(False)
            await self.server.run_stop_hooks()
        deadline = time.monotonic() + timeout_s
        while True:
            load = self.engine.load()
            remaining = load.num_running + load.num_waiting + self.leases.active
            if remaining == 0 or time.monotonic() >= deadline:
                return remaining
            await asyncio.sleep(0.05)  # polls the engine's published load


def worker_bindings(runtime: WorkerRuntime) -> list[ServiceBinding]:
    worker = WorkerServicer(runtime)
    transfer = KvTransferServicer(runtime)
    return [
        ServiceBinding(
            worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,
            lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(worker, s),
        ),
        ServiceBinding(
            worker_pb2.DESCRIPTOR.services_by_name["KvTransfer"].full_name,
            lambda s: worker_pb2_grpc.add_KvTransferServicer_to_server(transfer, s),
        ),
    ]


async def run_worker(
    config: WorkerConfig, tier_binding: Callable[[WorkerRuntime], ServiceBinding]
) -> None:
    runtime = WorkerRuntime(config)
    spec = ServiceSpec(
        role=config.tier,
        services=[tier_binding(runtime), *worker_bindings(runtime)],
        server=ServerConfig(
            host=config.host,
            port=config.port,
            grace_s=config.grace_s,
            max_receive_bytes=RECEIVE_BYTES["worker"],
        ),
        registry=config.registry,
        ttl_s=config.ttl_s,
        metrics_port=config.metrics_port,
    )

    def serving(server: RpcServer, metrics_port: int | None) -> None:
        runtime.server = server
        print(
            f"{config.tier} serving {server.address} worker_id={runtime.worker_id} "
            f"metrics_port={metrics_port}",
            flush=True,
        )

    try:
        await run_service(spec, warm_up=lambda: runtime.start(spec), on_serving=serving)
    finally:
        await runtime.stop()


def main(tier: Tier, tier_binding: Callable[[WorkerRuntime], ServiceBinding]) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m services.{tier}")
    add_worker_arguments(parser)
    args = parser.parse_args()
    options.configure_security(args, Role(tier.value))
    configure_logging(args.log_level, service=f"kvmesh-{tier.value}")
    try:
        asyncio.run(run_worker(config_from_arguments(tier, args), tier_binding))
    except (InvalidRequestError, ModelLoadError) as e:
        # A worker that cannot start as configured (no such engine, its library missing, a
        # bad option or model) says why in one line instead of a traceback.
        raise SystemExit(f"{parser.prog}: {e}") from None
