"""The ControlPlane RPCs of a real control plane process, over an embedded registry with two
datacenters (us-east, eu-west) on 127.0.0.1: auth, refusals that say why, cordons in the KV,
events, and a real scale up and down through the local actuator's worker processes."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from kvmesh.api.v1 import common_pb2, controlplane_pb2, controlplane_pb2_grpc
from kvmesh.discovery import Discovery
from kvmesh.discovery import keys as kv_keys
from kvmesh.discovery.registry import EmbeddedRegistry
from kvmesh.process import Child, start_child, stop_child, wait_ready
from kvmesh.rpc import bearer

T = TypeVar("T")

TOKEN = "secret"
ADMIN = bearer(TOKEN)
MODEL = "dummy:llama-tiny"
CLUSTERS = ("us-east", "eu-west")
CAPACITY = 2
START_TIMEOUT_S = 60.0
DECODE = common_pb2.TIER_DECODE


@dataclass
class ControlPlane:
    child: Child
    registry: EmbeddedRegistry
    discovery: Discovery  # the primary datacenter's agent, whose KV holds the mesh's keys
    stub: Any  # grpc's stubs type the calls as synchronous; these are grpc.aio calls

    @property
    def address(self) -> str:
        return self.child.address


@asynccontextmanager
async def running_controlplane(log_dir: Path) -> AsyncIterator[ControlPlane]:
    """The registry in-process, the control plane as a process; both stopped on the way out."""
    async with EmbeddedRegistry(CLUSTERS, port=0) as registry:
        primary = registry.address(CLUSTERS[0])
        argv = [
            sys.executable, "-m", "services.controlplane", "--registry", primary,
            *[f"--cluster={name}={registry.address(name)}" for name in CLUSTERS],
            "--model", MODEL, "--capacity", str(CAPACITY), "--admin-token", TOKEN,
            "--interval-s", "0.5", "--port", "0", "--metrics-port", "-1",
            "--log-dir", str(log_dir),
            "--worker-arg=--torch-threads=1", "--worker-arg=--num-blocks=64",  # 2 cores suffice
        ]  # fmt: skip
        child = await start_child("controlplane", argv, log_dir)
        try:
            await wait_ready(child, "controlplane serving", START_TIMEOUT_S)
            async with (
                Discovery(primary) as discovery,
                grpc.aio.insecure_channel(child.address) as channel,
            ):
                stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
                yield ControlPlane(child, registry, discovery, stub)
        finally:
            await stop_child(child, grace_s=10)


@pytest.fixture(scope="module")
async def controlplane(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ControlPlane]:
    async with running_controlplane(tmp_path_factory.mktemp("controlplane")) as running:
        yield running


async def eventually(
    probe: Callable[[], Awaitable[T]], condition: Callable[[T], bool], *, what: str
) -> T:
    """Ask `probe` until its answer meets `condition`. The control plane changes its state in the
    background (a worker starting, a drain finishing) and its API cannot wait for that."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not condition(answer := await probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {START_TIMEOUT_S:g} s; last: {answer}")
        await asyncio.sleep(0.2)  # polling the control plane, bounded by the deadline above
    return answer


async def list_workers(cp: ControlPlane, cluster: str = "") -> list[Any]:
    request = controlplane_pb2.ListWorkersRequest(cluster=cluster)
    return list((await cp.stub.ListWorkers(request, metadata=ADMIN)).workers)


async def list_events(cp: ControlPlane) -> list[Any]:
    request = controlplane_pb2.ListEventsRequest()
    return list((await cp.stub.ListEvents(request, metadata=ADMIN)).events)


async def refusal(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    return failure.value


def processes_with(*words: str) -> list[int]:
    """Live processes whose command line holds every one of `words` (Linux: /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # it exited meanwhile
            continue
        if all(word in argv for word in words):
            found.append(int(cmdline.parent.name))
    return found


async def test_every_rpc_needs_the_admin_token(controlplane: ControlPlane) -> None:
    stub = controlplane.stub
    scale = controlplane_pb2.ScaleRequest(model=MODEL, tier=DECODE, cluster="eu-west", replicas=1)
    calls: list[Callable[[Any], Awaitable[object]]] = [
        lambda md: stub.ListClusters(controlplane_pb2.ListClustersRequest(), metadata=md),
        lambda md: stub.ListWorkers(controlplane_pb2.ListWorkersRequest(), metadata=md),
        lambda md: stub.ListDeployments(controlplane_pb2.ListDeploymentsRequest(), metadata=md),
        lambda md: stub.Scale(scale, metadata=md),
        lambda md: stub.DrainWorker(
            controlplane_pb2.DrainWorkerRequest(worker_id="w"), metadata=md
        ),
        lambda md: stub.CordonCluster(
            controlplane_pb2.CordonClusterRequest(cluster="eu-west"), metadata=md
        ),
        lambda md: stub.UncordonCluster(
            controlplane_pb2.UncordonClusterRequest(cluster="eu-west"), metadata=md
        ),
        lambda md: stub.ListEvents(controlplane_pb2.ListEventsRequest(), metadata=md),
    ]
    for call in calls:
        for metadata in [(), bearer("wrong")]:
            failure = await refusal(call(metadata))
            assert failure.code() == grpc.StatusCode.UNAUTHENTICATED
    # The refused Scale and Cordon changed nothing.
    _, pinned = await controlplane.discovery.kv_list(kv_keys.PINNED_PREFIX)
    _, cordoned = await controlplane.discovery.kv_list(kv_keys.CORDON_PREFIX)
    assert pinned == [] and cordoned == []


async def test_both_clusters_are_listed_unhealthy_without_a_router(
    controlplane: ControlPlane,
) -> None:
    found = await controlplane.stub.ListClusters(
        controlplane_pb2.ListClustersRequest(), metadata=ADMIN
    )
    assert {c.name for c in found.clusters} == set(CLUSTERS)
    for cluster in found.clusters:
        assert not cluster.healthy and not cluster.cordoned
        assert (cluster.capacity_replicas, cluster.num_workers) == (CAPACITY, 0)


async def test_cordon_and_uncordon_round_trip_through_the_kv(controlplane: ControlPlane) -> None:
    stub, key = controlplane.stub, kv_keys.cordon_key("eu-west")
    cordoned = await stub.CordonCluster(
        controlplane_pb2.CordonClusterRequest(cluster="eu-west"), metadata=ADMIN
    )
    assert (cordoned.name, cordoned.cordoned) == ("eu-west", True)
    assert (await controlplane.discovery.kv_get(key))[1] is not None
    listed = await stub.ListClusters(controlplane_pb2.ListClustersRequest(), metadata=ADMIN)
    assert {c.name: c.cordoned for c in listed.clusters} == {"us-east": False, "eu-west": True}

    uncordoned = await stub.UncordonCluster(
        controlplane_pb2.UncordonClusterRequest(cluster="eu-west"), metadata=ADMIN
    )
    assert (uncordoned.name, uncordoned.cordoned) == ("eu-west", False)
    assert (await controlplane.discovery.kv_get(key))[1] is None

    newest, older = (await list_events(controlplane))[:2]
    assert (newest.kind, newest.message) == ("uncordon", "eu-west uncordoned")
    assert (older.kind, older.message) == ("cordon", "eu-west cordoned")
    assert newest.time.ToNanoseconds() >= older.time.ToNanoseconds() > 0


async def test_unknown_or_empty_clusters_are_refused(controlplane: ControlPlane) -> None:
    stub = controlplane.stub
    for cordon, request_type in [
        (stub.CordonCluster, controlplane_pb2.CordonClusterRequest),
        (stub.UncordonCluster, controlplane_pb2.UncordonClusterRequest),
    ]:
        unknown = await refusal(cordon(request_type(cluster="ap-south"), metadata=ADMIN))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        assert "'ap-south'" in (unknown.details() or "")
        assert "eu-west, us-east" in (unknown.details() or "")
        empty = await refusal(cordon(request_type(cluster=""), metadata=ADMIN))
        assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cluster" in (empty.details() or "")
    workers = controlplane_pb2.ListWorkersRequest(cluster="ap-south")
    unknown = await refusal(stub.ListWorkers(workers, metadata=ADMIN))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    _, cordoned = await controlplane.discovery.kv_list(kv_keys.CORDON_PREFIX)
    assert cordoned == []


@pytest.mark.parametrize(
    ("fields", "code", "named"),
    [
        ({"tier": common_pb2.TIER_UNSPECIFIED}, grpc.StatusCode.INVALID_ARGUMENT, "tier"),
        ({"model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model"),
        ({"cluster": ""}, grpc.StatusCode.INVALID_ARGUMENT, "eu-west, us-east"),
        ({"replicas": CAPACITY + 1}, grpc.StatusCode.INVALID_ARGUMENT, "capacity"),
        ({"cluster": "ap-south"}, grpc.StatusCode.NOT_FOUND, "'ap-south'"),
    ],
)
async def test_scale_refuses_what_it_cannot_do(
    controlplane: ControlPlane, fields: dict[str, Any], code: grpc.StatusCode, named: str
) -> None:
    request: dict[str, Any] = {"model": MODEL, "tier": DECODE, "cluster": "eu-west", "replicas": 1}
    request |= fields
    failure = await refusal(
        controlplane.stub.Scale(controlplane_pb2.ScaleRequest(**request), metadata=ADMIN)
    )
    assert failure.code() == code
    assert named in (failure.details() or "")
    _, pinned = await controlplane.discovery.kv_list(kv_keys.PINNED_PREFIX)
    assert pinned == []


async def test_draining_an_unknown_worker_is_refused(controlplane: ControlPlane) -> None:
    drain = controlplane.stub.DrainWorker
    unknown = await refusal(
        drain(controlplane_pb2.DrainWorkerRequest(worker_id="decode-0000"), metadata=ADMIN)
    )
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert "'decode-0000'" in (unknown.details() or "")
    empty = await refusal(drain(controlplane_pb2.DrainWorkerRequest(), metadata=ADMIN))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_scale_starts_drains_and_stops_worker_processes(tmp_path: Path) -> None:
    """Pin a decode replica in each cluster, then eu-west's to 0 (drained, then removed), then
    stop the control plane: the us-east worker it still runs stops with it."""
    async with running_controlplane(tmp_path) as cp:
        agents = {name: cp.registry.address(name) for name in CLUSTERS}

        async def scale(cluster: str, replicas: int) -> Any:
            request = controlplane_pb2.ScaleRequest(
                model=MODEL, tier=DECODE, cluster=cluster, replicas=replicas
            )
            return await cp.stub.Scale(request, metadata=ADMIN)

        for cluster in CLUSTERS:
            pinned = await scale(cluster, 1)
            assert (pinned.cluster, pinned.desired_replicas, pinned.pinned) == (cluster, 1, True)
        workers = await eventually(
            lambda: list_workers(cp),
            lambda ws: sorted(w.cluster for w in ws) == sorted(CLUSTERS),
            what="a decode worker in each cluster",
        )
        by_cluster = {w.cluster: w for w in workers}
        for cluster, worker in by_cluster.items():
            assert (worker.model, worker.tier) == (MODEL, DECODE)
            # It registered with its own cluster's agent.
            assert len(processes_with("services.decode", agents[cluster])) == 1
        deployments = await cp.stub.ListDeployments(
            controlplane_pb2.ListDeploymentsRequest(), metadata=ADMIN
        )
        assert {
            (d.model, d.tier, d.cluster, d.desired_replicas, d.ready_replicas, d.pinned)
            for d in deployments.deployments
        } == {(MODEL, DECODE, cluster, 1, 1, True) for cluster in CLUSTERS}

        down = await scale("eu-west", 0)
        assert (down.desired_replicas, down.pinned) == (0, True)
        await eventually(lambda: list_workers(cp, "eu-west"), lambda ws: not ws, what="none left")
        events = await eventually(
            lambda: list_events(cp),
            lambda es: any(e.kind == "scale_down" for e in es),
            what="a scale_down event",
        )
        (removed,) = [e for e in events if e.kind == "scale_down"]
        assert removed.message.startswith("eu-west: drained and removed eu-west-decode-")
        assert processes_with("services.decode", agents["eu-west"]) == []
        assert [w.worker_id for w in await list_workers(cp)] == [by_cluster["us-east"].worker_id]

        cp.child.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(cp.child.process.wait(), 30) == 0
        assert processes_with("services.decode", agents["us-east"]) == []
