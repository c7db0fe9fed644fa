"""Wiring: discovery -> worker pool -> Generation servicer -> run_service."""

from __future__ import annotations

import asyncio

import structlog

from kvmesh import models
from kvmesh.api.v1 import generation_pb2, generation_pb2_grpc
from kvmesh.discovery import Discovery
from kvmesh.rpc import RpcServer, ServerConfig, ServiceBinding
from kvmesh.rpc.server import RECEIVE_BYTES
from kvmesh.rpc.service import ServiceSpec, run_service
from kvmesh.text import load_tokenizer
from services.router.admission import Admission
from services.router.args import RouterConfig
from services.router.index import PrefixIndex
from services.router.outliers import OutlierDetector
from services.router.planning import Planner
from services.router.policy import Router
from services.router.pool import WorkerPool
from services.router.servicer import GenerationServicer
from services.router.wake import WakeSignal

log = structlog.get_logger(__name__)


async def run_router(config: RouterConfig) -> None:
    source = await asyncio.to_thread(models.resolve, config.model)
    tokenizer = None
    if source.tokenizer_dir is None:  # a dummy model at a shape no local tokenizer has
        log.warning("model has no tokenizer: serving token ids only", model=source.model_id)
    else:
        tokenizer = await asyncio.to_thread(load_tokenizer, source.tokenizer_dir)
    discovery = Discovery(config.registry)
    index = PrefixIndex(approx_ttl_s=config.approx_ttl_s, pending_ttl_s=config.pending_ttl_s)
    pool = WorkerPool(
        discovery,
        load_interval_ms=config.load_interval_ms,
        index=index,
        only_workers=config.only_workers,
        kv_stall_s=config.kv_stall_s,
        outliers=OutlierDetector(config.outliers),
    )
    planner = Planner(
        pool, Router(config.policy, index), disagg_min_tokens=config.disagg_min_tokens
    )
    wake = WakeSignal(discovery, source.model_id, "decode", datacenter=config.kv_datacenter)
    admission = Admission(
        pool,
        wake,
        saturation_in_flight=config.saturation_in_flight,
        wake_timeout_s=config.wake_timeout_s,
        max_in_flight=config.max_in_flight,
        max_queue=config.max_queue,
    )
    servicer = GenerationServicer(config, pool, tokenizer, source.model_id, planner, admission)
    binding = ServiceBinding(
        generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
        lambda server: generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server),
    )
    spec = ServiceSpec(
        role="router",
        services=[binding],
        server=ServerConfig(
            host=config.host,
            port=config.port,
            grace_s=config.grace_s,
            max_receive_bytes=RECEIVE_BYTES["router"],
        ),
        registry=config.registry,
        tags=[f"model={source.model_id}", "role=router"],
        metrics_port=config.metrics_port,
    )

    def serving(server: RpcServer, metrics_port: int | None) -> None:
        wake.router = server.address
        print(f"router serving {server.address} metrics_port={metrics_port}", flush=True)

    await pool.start()
    try:
        await run_service(spec, on_serving=serving)
    finally:
        await pool.stop()
        await discovery.close()
