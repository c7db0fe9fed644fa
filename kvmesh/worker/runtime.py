"""What a worker process is: an engine, a NIXL transfer agent, leases, and its gRPC services.

`run_worker(config, tier_binding)` is the main loop of both `services.prefill` and
`services.decode`; each adds the one service that makes it what it is (`Prefill`, `Decode`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import torch
from prometheus_client import REGISTRY

from kvmesh import tiers
from kvmesh.api.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.engine import EngineConfig, EngineStoppedError, TorchEngine
from kvmesh.kv.transfer import KvTransferAgent
from kvmesh.rpc import RpcServer, ServerConfig, ServiceBinding
from kvmesh.rpc.service import ServiceSpec, run_service
from kvmesh.telemetry import configure_logging, metrics
from kvmesh.worker.leases import LeaseTable
from kvmesh.worker.servicers import KvTransferServicer, WorkerServicer

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class WorkerConfig:
    tier: str  # "prefill" or "decode"
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 0
    registry: str | None = None
    worker_id: str = ""
    lease_s: float = 30.0
    ttl_s: float = 2.0
    metrics_port: int | None = 0
    torch_threads: int = 0  # 0: PyTorch's default
    grace_s: float = 10.0
    kv_events: bool = True  # publish KV events for routers' prefix indexes


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-batched-tokens", type=int, default=2048)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument(
        "--registry",
        default=os.environ.get("CONSUL_HTTP_ADDR"),
        help="Consul / embedded registry address (default: $CONSUL_HTTP_ADDR)",
    )
    parser.add_argument("--worker-id", default="")
    parser.add_argument(
        "--lease-s", type=float, default=30.0, help="how long exported KV stays pinned"
    )
    parser.add_argument("--ttl-s", type=float, default=2.0, help="discovery TTL check")
    parser.add_argument("--metrics-port", type=int, default=0, help="-1: no /metrics endpoint")
    parser.add_argument("--torch-threads", type=int, default=0)
    parser.add_argument("--grace-s", type=float, default=10.0)
    parser.add_argument(
        "--no-kv-events",
        dest="kv_events",
        action="store_false",
        help="publish no KV events: routers index this worker approximately",
    )
    parser.add_argument("--log-level", default="INFO")


def config_from_arguments(tier: str, args: argparse.Namespace) -> WorkerConfig:
    engine = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens,
    )
    return WorkerConfig(
        tier=tier,
        engine=engine,
        host=args.host,
        port=args.port,
        registry=args.registry,
        worker_id=args.worker_id,
        lease_s=args.lease_s,
        ttl_s=args.ttl_s,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        torch_threads=args.torch_threads,
        grace_s=args.grace_s,
        kv_events=args.kv_events,
    )


class WorkerRuntime:
    """Owns the engine and what hangs off it; built before serving, warmed up in `start`."""

    def __init__(self, config: WorkerConfig) -> None:
        if config.tier not in tiers.TIERS:
            raise ValueError(f"tier must be one of {sorted(tiers.TIERS)}")
        self.config = config
        self.worker_id = config.worker_id or f"{config.tier}-{uuid.uuid4().hex[:8]}"
        self._engine: TorchEngine | None = None
        self._transfer: KvTransferAgent | None = None
        self._leases: LeaseTable | None = None
        self.server: RpcServer | None = None
        self.draining = False

    @property
    def engine(self) -> TorchEngine:
        if self._engine is None:
            raise EngineStoppedError("the worker is still warming up")
        return self._engine

    @property
    def transfer(self) -> KvTransferAgent:
        if self._transfer is None:
            raise EngineStoppedError("the worker is still warming up")
        return self._transfer

    @property
    def leases(self) -> LeaseTable:
        if self._leases is None:
            raise EngineStoppedError("the worker is still warming up")
        return self._leases

    async def start(self, spec: ServiceSpec) -> None:
        """Load the model, register the KV pool with NIXL, start leases; fill discovery meta."""
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        engine = await asyncio.to_thread(TorchEngine, self.config.engine, show_progress=False)
        await engine.start()
        self._engine = engine
        self._transfer = KvTransferAgent(self.worker_id, engine.kv_cache)
        self._leases = LeaseTable(
            engine.release_export, take_notifications=self._transfer.take_notifications
        )
        self._leases.start()
        REGISTRY.register(metrics.EngineCollector(engine, self.config.tier))
        info = engine.info
        spec.tags = [f"model={info.model_id}", f"role={self.config.tier}"]
        spec.meta = {
            "worker_id": self.worker_id,
            "model": info.model_id,
            "block_size": str(info.block_size),
            "layout": info.layout_fingerprint,
            "engine": "torch",
            "nixl_agent": self.worker_id,
            "max_model_len": str(info.max_model_len),
        }

    async def stop(self) -> None:
        if self._leases is not None:
            await self._leases.stop()
        if self._engine is not None:
            await self._engine.stop()
        if self._transfer is not None:
            self._transfer.close()

    def info(self) -> worker_pb2.WorkerInfo:
        info = self.engine.info
        return worker_pb2.WorkerInfo(
            worker_id=self.worker_id,
            tier=tiers.to_proto(self.config.tier),
            model=info.model_id,
            block_size=info.block_size,
            num_blocks=info.num_blocks,
            layout_fingerprint=info.layout_fingerprint,
            max_model_len=info.max_model_len,
            engine="torch",
            device=info.device,
            nixl_agent=self.worker_id,
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
        server=ServerConfig(host=config.host, port=config.port, grace_s=config.grace_s),
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


def main(tier: str, tier_binding: Callable[[WorkerRuntime], ServiceBinding]) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m services.{tier}")
    add_worker_arguments(parser)
    args = parser.parse_args()
    configure_logging(args.log_level)
    asyncio.run(run_worker(config_from_arguments(tier, args), tier_binding))
