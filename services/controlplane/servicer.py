"""The `ControlPlane` admin RPCs over `ControlPlane` (plane.py).

Bad input raises `InvalidRequestError` (INVALID_ARGUMENT), an unknown cluster or worker
`NotFoundError` (NOT_FOUND), a registry that cannot be reached `UnavailableError`; the
interceptors map them. Authentication is the server's (`TokenAuthenticator`).
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import timestamp_pb2

from kvmesh import tiers
from kvmesh.api.v1 import controlplane_pb2, controlplane_pb2_grpc
from kvmesh.errors import InvalidRequestError
from services.controlplane.plane import ClusterView, ControlPlane, DeploymentView


class ControlPlaneServicer(controlplane_pb2_grpc.ControlPlaneServicer):
    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane

    async def ListClusters(
        self, request: Any, context: Any
    ) -> controlplane_pb2.ListClustersResponse:
        clusters = await self._plane.clusters()
        return controlplane_pb2.ListClustersResponse(clusters=[_cluster(c) for c in clusters])

    async def ListWorkers(
        self, request: controlplane_pb2.ListWorkersRequest, context: Any
    ) -> controlplane_pb2.ListWorkersResponse:
        workers = await self._plane.workers(request.cluster)
        return controlplane_pb2.ListWorkersResponse(
            workers=[
                controlplane_pb2.WorkerSummary(
                    worker_id=w.worker_id,
                    cluster=w.cluster,
                    model=w.model,
                    tier=tiers.to_proto(w.tier),
                    grpc_address=w.address,
                    healthy=w.load is not None,
                    num_running=w.load.num_running if w.load else 0,
                    num_waiting=w.load.num_waiting if w.load else 0,
                )
                for w in workers
            ]
        )

    async def ListDeployments(
        self, request: Any, context: Any
    ) -> controlplane_pb2.ListDeploymentsResponse:
        deployments = await self._plane.deployments()
        return controlplane_pb2.ListDeploymentsResponse(
            deployments=[_deployment(d) for d in deployments]
        )

    async def Scale(
        self, request: controlplane_pb2.ScaleRequest, context: Any
    ) -> controlplane_pb2.Deployment:
        tier = _tier(request.tier)
        replicas = None if request.unpin else request.replicas
        return _deployment(await self._plane.scale(request.model, tier, request.cluster, replicas))

    async def DrainWorker(
        self, request: controlplane_pb2.DrainWorkerRequest, context: Any
    ) -> controlplane_pb2.DrainWorkerResponse:
        drained = await self._plane.drain_worker(request.worker_id)
        return controlplane_pb2.DrainWorkerResponse(drained=drained)

    async def CordonCluster(
        self, request: controlplane_pb2.CordonClusterRequest, context: Any
    ) -> controlplane_pb2.Cluster:
        return _cluster(await self._plane.cordon(_cluster_name(request.cluster), True))

    async def UncordonCluster(
        self, request: controlplane_pb2.UncordonClusterRequest, context: Any
    ) -> controlplane_pb2.Cluster:
        return _cluster(await self._plane.cordon(_cluster_name(request.cluster), False))

    async def ListEvents(
        self, request: controlplane_pb2.ListEventsRequest, context: Any
    ) -> controlplane_pb2.ListEventsResponse:
        return controlplane_pb2.ListEventsResponse(
            events=[
                controlplane_pb2.Event(time=_timestamp(e.time), kind=e.kind, message=e.message)
                for e in self._plane.events(request.limit)
            ]
        )


def _tier(value: int) -> str:
    tier = tiers.from_proto(value)
    if tier not in tiers.TIERS:
        raise InvalidRequestError(f"tier must be TIER_PREFILL or TIER_DECODE, not {value}")
    return tier


def _cluster_name(name: str) -> str:
    if not name:
        raise InvalidRequestError("cluster must not be empty")
    return name


def _cluster(view: ClusterView) -> controlplane_pb2.Cluster:
    return controlplane_pb2.Cluster(
        name=view.name,
        cordoned=view.cordoned,
        healthy=view.healthy,
        capacity_replicas=view.capacity,
        num_workers=len(view.workers),
    )


def _deployment(view: DeploymentView) -> controlplane_pb2.Deployment:
    return controlplane_pb2.Deployment(
        model=view.model,
        tier=tiers.to_proto(view.tier),
        cluster=view.cluster,
        desired_replicas=view.desired,
        ready_replicas=view.ready,
        pinned=view.pinned,
    )


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    whole = math.floor(seconds)
    return timestamp_pb2.Timestamp(
        seconds=whole, nanos=min(round((seconds - whole) * 1e9), 999_999_999)
    )
