"""A small real service for testing the mesh plumbing.

    python -m tests.integration.rpc.sample_service --registry 127.0.0.1:PORT


It serves `kvmesh.v1.Worker` through `kvmesh.rpc.service.run_service` exactly as the real
services do. `Drain(timeout_ms)` stands for in-flight work: it takes that long to answer.
`GetKvSnapshot` fails on purpose, for the error-mapping tests.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from kvmesh.api.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from kvmesh.errors import InvalidRequestError
from kvmesh.rpc import ServerConfig, ServiceBinding
from kvmesh.rpc.service import ServiceSpec, run_service
from kvmesh.telemetry import configure_logging

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


class SampleWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.calls = 0
        self.draining = asyncio.Event()  # set while a Drain call is in flight

    async def GetInfo(self, request: Any, context: Any) -> worker_pb2.WorkerInfo:
        self.calls += 1
        return worker_pb2.WorkerInfo(worker_id=self.worker_id, tier=common_pb2.TIER_DECODE)

    async def Drain(self, request: Any, context: Any) -> worker_pb2.DrainResponse:
        self.draining.set()
        print("draining", flush=True)  # tells a test driving this process that work is in flight
        await asyncio.sleep(request.timeout_ms / 1000)  # stands for in-flight work
        return worker_pb2.DrainResponse(drained=True)

    async def GetKvSnapshot(self, request: Any, context: Any) -> worker_pb2.KvSnapshot:
        raise InvalidRequestError("snapshots are not served by the sample worker")


def binding(servicer: SampleWorker) -> ServiceBinding:
    return ServiceBinding(
        WORKER_SERVICE,
        lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registry", default=None)
    parser.add_argument("--ttl", type=float, default=1.0)
    parser.add_argument("--grpc-check", action="store_true")
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--worker-id", default="sample")
    args = parser.parse_args()
    configure_logging("INFO", json=True)
    spec = ServiceSpec(
        role="sample",
        services=[binding(SampleWorker(args.worker_id))],
        server=ServerConfig(grace_s=args.grace),
        registry=args.registry,
        meta={"worker_id": args.worker_id},
        ttl_s=None if args.grpc_check else args.ttl,
        grpc_check_interval_s=0.5,
        deregister_critical_after_s=30.0,
        metrics_port=None,
    )

    def announce(server: Any, metrics_port: int | None) -> None:
        print(f"serving {server.address}", flush=True)

    asyncio.run(run_service(spec, on_serving=announce))


if __name__ == "__main__":
    main()
