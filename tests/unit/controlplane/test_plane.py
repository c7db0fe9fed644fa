"""ControlPlane.reconcile against a scripted registry and actuators: placement, drain before
removal, cordons, pins, failures as events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence

import pytest

from kvmesh.api.v1 import worker_pb2
from kvmesh.discovery import KvEntry, ServiceInstance
from kvmesh.rpc.errors import NotFoundError
from services.controlplane.actuator import ActuatorError, Replica
from services.controlplane.plane import ControlPlane


class FakeDiscovery:
    def __init__(self, datacenters: Sequence[str]) -> None:
        self.dcs = list(datacenters)
        self.kv: dict[str, bytes] = {}
        self.instances: dict[tuple[str, str], list[ServiceInstance]] = {}
        for dc in datacenters:  # a router serving model "m" in every cluster
            self.instances[(dc, "kvmesh-router")] = [
                ServiceInstance(f"r-{dc}", "kvmesh-router", "127.0.0.1", 1, ("model=m",))
            ]

    async def datacenters(self) -> list[str]:
        return self.dcs

    async def healthy(
        self, service: str, *, datacenter: str | None = None
    ) -> tuple[int, list[ServiceInstance]]:
        return 1, self.instances.get((datacenter or "", service), [])

    async def kv_list(self, prefix: str) -> tuple[int, list[KvEntry]]:
        return 1, [KvEntry(k, v, 1) for k, v in sorted(self.kv.items()) if k.startswith(prefix)]

    async def kv_put(self, key: str, value: bytes | str) -> bool:
        self.kv[key] = value.encode() if isinstance(value, str) else value
        return True

    async def kv_delete(self, key: str) -> bool:
        return self.kv.pop(key, None) is not None


class FakeClients:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def loads(self, addresses: Iterable[str]) -> dict[str, worker_pb2.LoadReport | None]:
        return {a: worker_pb2.LoadReport() for a in addresses}

    async def drain(self, address: str, timeout_s: float) -> worker_pb2.DrainResponse:
        self.log.append(f"drain {address}")
        return worker_pb2.DrainResponse(drained=True)

    async def close(self) -> None:
        pass


class FakeActuator:
    def __init__(self, cluster: str, log: list[str], capacity: int = 4) -> None:
        self._cluster = cluster
        self._capacity = capacity
        self.log = log
        self.running: list[Replica] = []
        self.fail_add = False
        self._n = 0

    @property
    def cluster(self) -> str:
        return self._cluster

    @property
    def capacity(self) -> int:
        return self._capacity

    async def replicas(self, model: str, tier: str) -> list[Replica]:
        return [r for r in self.running if (r.model, r.tier) == (model, tier)]

    async def add(self, model: str, tier: str, count: int) -> list[Replica]:
        if self.fail_add:
            raise ActuatorError("no room at the inn")
        added = []
        for _ in range(count):
            self._n += 1
            name = f"{self._cluster}-{tier}-{self._n}"
            added.append(Replica(name, model, tier, name, f"{name}:1", ready=True))
        self.running += added
        self.log.append(f"add {self._cluster} {model}/{tier} {count}")
        return added

    async def remove(self, model: str, tier: str, names: Sequence[str]) -> None:
        self.running = [r for r in self.running if r.name not in names]
        self.log.append(f"remove {', '.join(names)}")

    async def close(self) -> None:
        pass


def _plane(
    *clusters: str,
) -> tuple[ControlPlane, FakeDiscovery, dict[str, FakeActuator], list[str]]:
    log: list[str] = []
    discovery = FakeDiscovery(clusters)
    actuators = {c: FakeActuator(c, log) for c in clusters}
    plane = ControlPlane(
        discovery,  # type: ignore[arg-type]
        actuators,
        clients=FakeClients(log),  # type: ignore[arg-type]
        clock=lambda: 1000.0,
    )
    return plane, discovery, actuators, log


def _desire(discovery: FakeDiscovery, n: int, tier: str = "decode") -> None:
    discovery.kv[f"kvmesh/autoscaler/desired/m/{tier}"] = json.dumps({"desired": n}).encode()


async def _settle(plane: ControlPlane) -> None:
    await plane.reconcile()
    while plane._tasks:  # background drains
        await asyncio.gather(*plane._tasks)


async def test_the_desired_total_is_spread_over_the_clusters() -> None:
    plane, discovery, actuators, _ = _plane("eu-west", "us-east")
    _desire(discovery, 3)
    await _settle(plane)
    counts = {c: len(a.running) for c, a in actuators.items()}
    assert sorted(counts.values()) == [1, 2] and sum(counts.values()) == 3
    deployments = {(d.cluster, d.desired) for d in await plane.deployments()}
    assert deployments == set(counts.items())


async def test_extra_replicas_are_drained_before_they_are_removed() -> None:
    plane, discovery, actuators, log = _plane("dc1")
    _desire(discovery, 2)
    await _settle(plane)
    _desire(discovery, 1)
    log.clear()
    await _settle(plane)
    assert len(actuators["dc1"].running) == 1
    assert log[0].startswith("drain ") and log[1].startswith("remove ")
    assert log[0].removeprefix("drain ").split(":")[0] == log[1].removeprefix("remove ")
    assert plane.events()[0].kind == "scale_down"


async def test_a_cordoned_cluster_is_drained_and_its_share_moves() -> None:
    plane, discovery, actuators, _ = _plane("a", "b")
    _desire(discovery, 2)
    await _settle(plane)
    assert [len(actuators[c].running) for c in "ab"] == [1, 1]
    await plane.cordon("a", True)
    await _settle(plane)
    assert [len(actuators[c].running) for c in "ab"] == [0, 2]
    assert "kvmesh/controlplane/cordon/a" in discovery.kv
    await plane.cordon("a", False)
    assert "kvmesh/controlplane/cordon/a" not in discovery.kv
    with pytest.raises(NotFoundError, match="no cluster 'c'"):
        await plane.cordon("c", True)


async def test_a_cluster_without_a_router_for_the_model_gets_nothing() -> None:
    plane, discovery, actuators, _ = _plane("a", "b")
    discovery.instances[("a", "kvmesh-router")] = []
    _desire(discovery, 2)
    await _settle(plane)
    assert [len(actuators[c].running) for c in "ab"] == [0, 2]


async def test_a_pin_holds_its_cluster_and_unpinning_returns_it() -> None:
    plane, discovery, actuators, _ = _plane("a", "b")
    _desire(discovery, 2)
    await _settle(plane)
    deployment = await plane.scale("m", "decode", "a", 3)
    await _settle(plane)
    assert (deployment.pinned, len(actuators["a"].running)) == (True, 3)
    await plane.scale("m", "decode", "a", None)
    await _settle(plane)
    assert sum(len(a.running) for a in actuators.values()) == 2


async def test_an_actuator_failure_is_an_event_and_retried() -> None:
    plane, discovery, actuators, _ = _plane("dc1")
    actuators["dc1"].fail_add = True
    _desire(discovery, 1)
    await _settle(plane)
    assert plane.events()[0].kind == "error"
    assert "no room at the inn" in plane.events()[0].message
    actuators["dc1"].fail_add = False
    await _settle(plane)
    assert len(actuators["dc1"].running) == 1


async def test_a_pair_without_desired_or_pin_is_left_alone() -> None:
    plane, _discovery, actuators, log = _plane("dc1")
    await actuators["dc1"].add("m", "decode", 2)
    log.clear()
    await _settle(plane)
    assert log == [] and len(actuators["dc1"].running) == 2


async def test_drain_worker_removes_an_owned_replica() -> None:
    plane, discovery, actuators, _log = _plane("dc1")
    _desire(discovery, 1)
    await _settle(plane)
    worker_id = actuators["dc1"].running[0].worker_id
    assert await plane.drain_worker(worker_id)
    assert actuators["dc1"].running == []
    with pytest.raises(NotFoundError):
        await plane.drain_worker("nobody")
