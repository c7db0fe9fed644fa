"""The control plane's global view and its reconcile loop.

Every `interval_s` the plane reads, from the registry:

- the clusters: every Consul datacenter; a cluster is *healthy* when a router serving the model
  passes its check there, *cordoned* when `kvmesh/controlplane/cordon/<cluster>` exists;
- what the autoscaler wants: `kvmesh/autoscaler/desired/<model>/<tier>` (a total over clusters);
- what operators pinned: `kvmesh/controlplane/pinned/<model>/<tier>/<cluster>`;
- the workers each datacenter lists as passing, with their load (one `WatchLoad` report each);

then, for each (model, tier), places the desired total over the clusters (`placement.py`:
capacity, spread, demand; nothing on a cordoned or unhealthy cluster) and moves each cluster's
actuator toward its share: `add` for missing replicas, and for extra ones *drain, then remove*
(`Worker.Drain`: NOT_SERVING -> deregister -> in-flight requests finish; then the actuator
stops the process or scales the Deployment). Drains run in the background so one slow drain
does not hold the loop; a replica being drained is not counted and not chosen again.

A (model, tier) with no desired key and no pin is left as it is. Every action and failure is an
`Event` (`ListEvents`), and every failure is retried on the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc
import structlog

from kvmesh.api.v1 import worker_pb2
from kvmesh.discovery import Discovery, DiscoveryError
from kvmesh.discovery import keys as kv_keys
from kvmesh.errors import InvalidRequestError
from kvmesh.rpc.errors import NotFoundError, UnavailableError
from kvmesh.tiers import TIERS
from kvmesh.worker.remote import WorkerClients
from services.controlplane.actuator import Actuator, ActuatorError, Replica
from services.controlplane.placement import ClusterSlot, place

log = structlog.get_logger(__name__)

DEFAULT_INTERVAL_S = 2.0
DEFAULT_DRAIN_TIMEOUT_S = 60.0
EVENTS_KEPT = 1000

Pair = tuple[str, str]  # (model, tier)


@dataclass(frozen=True, slots=True)
class Event:
    time: float
    kind: str  # scale_up, scale_down, drain, cordon, uncordon, pin, unpin, error
    message: str


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    cluster: str
    model: str
    tier: str
    address: str
    load: worker_pb2.LoadReport | None = None

    @property
    def in_flight(self) -> int:
        return 0 if self.load is None else self.load.num_running + self.load.num_waiting


@dataclass(slots=True)
class ClusterView:
    name: str
    cordoned: bool = False
    healthy: bool = False  # a router serving some model passes its check here
    capacity: int = 0  # 0: no actuator (observed only)
    router_models: set[str] = field(default_factory=set)
    workers: list[WorkerView] = field(default_factory=list)
    reachable: bool = True


@dataclass(frozen=True, slots=True)
class DeploymentView:
    model: str
    tier: str
    cluster: str
    desired: int
    ready: int
    pinned: bool = False


@dataclass(slots=True)
class Snapshot:
    clusters: dict[str, ClusterView]
    desired: dict[Pair, int]
    pinned: dict[tuple[str, str, str], int]  # (model, tier, cluster) -> replicas


class ControlPlane:
    def __init__(
        self,
        discovery: Discovery,
        actuators: Mapping[str, Actuator],
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        clients: WorkerClients | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {interval_s}")
        self._discovery = discovery
        self._actuators = dict(actuators)
        self._interval_s = interval_s
        self._drain_timeout_s = drain_timeout_s
        self._clients = clients or WorkerClients()
        self._clock = clock
        self._events: deque[Event] = deque(maxlen=EVENTS_KEPT)
        self._placed: dict[tuple[str, str, str], int] = {}  # (model, tier, cluster) -> target
        self._draining: set[tuple[str, str]] = set()  # (cluster, replica name)
        self._tasks: set[asyncio.Task[bool]] = set()
        self._lock = asyncio.Lock()  # one reconcile at a time (the loop, Scale, Cordon)

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self.reconcile()
            except DiscoveryError as e:
                log.warning("control plane pass skipped: registry unavailable", error=str(e))
            await asyncio.sleep(self._interval_s)

    async def close(self, grace_s: float = 10.0) -> None:
        """Let drains in progress finish (for `grace_s` at most), then stop the actuators,
        which stop whatever they still run."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for actuator in self._actuators.values():
            await actuator.close()
        await self._clients.close()

    async def reconcile(self) -> None:
        async with self._lock:
            snapshot = await self.snapshot()
            replicas = {
                (cluster, model, tier): await actuator.replicas(model, tier)
                for cluster, actuator in self._actuators.items()
                for model, tier in self._pairs(snapshot)
            }
            for pair in sorted(self._pairs(snapshot)):
                await self._reconcile_pair(pair, snapshot, replicas)

    def _pairs(self, snapshot: Snapshot) -> set[Pair]:
        return set(snapshot.desired) | {(m, t) for m, t, _ in snapshot.pinned}

    async def _reconcile_pair(
        self,
        pair: Pair,
        snapshot: Snapshot,
        replicas: Mapping[tuple[str, str, str], list[Replica]],
    ) -> None:
        model, tier = pair
        live = {
            cluster: [
                r for r in replicas[(cluster, model, tier)] if not self._is_draining(cluster, r)
            ]
            for cluster in self._actuators
        }
        used = {
            cluster: sum(
                len([r for r in rs if not self._is_draining(cluster, r)])
                for (c, m, t), rs in replicas.items()
                if c == cluster and (m, t) != pair
            )
            for cluster in self._actuators
        }
        slots = []
        for cluster, actuator in sorted(self._actuators.items()):
            view = snapshot.clusters.get(cluster, ClusterView(cluster, reachable=False))
            open_ = not view.cordoned and view.reachable and model in view.router_models
            demand = sum(w.in_flight for w in view.workers if (w.model, w.tier) == pair)
            pinned = snapshot.pinned.get((model, tier, cluster))
            slots.append(
                ClusterSlot(
                    name=cluster,
                    room=max(0, actuator.capacity - used[cluster]),
                    open=open_,
                    demand=float(demand),
                    current=len(live[cluster]),
                    pinned=None if view.cordoned else pinned,
                )
            )
        total = snapshot.desired.get(pair)
        if total is None:  # only pins: the unpinned clusters keep what they have
            total = sum(s.pinned if s.pinned is not None else s.current for s in slots)
        placement = place(total, slots)
        if placement.unplaced:
            self._event(
                "error",
                f"{model}/{tier}: {placement.unplaced} of {total} replicas fit in no open "
                "cluster (cordoned, unhealthy or full)",
            )
        for cluster, target in placement.replicas.items():
            self._placed[(model, tier, cluster)] = target
            await self._apply(cluster, model, tier, target, live[cluster], snapshot)

    async def _apply(
        self,
        cluster: str,
        model: str,
        tier: str,
        target: int,
        live: list[Replica],
        snapshot: Snapshot,
    ) -> None:
        actuator = self._actuators[cluster]
        current = len(live)
        if target > current:
            try:
                await actuator.add(model, tier, target - current)
            except ActuatorError as e:
                self._event("error", f"{cluster}: adding {model}/{tier} failed: {e}")
                return
            self._event("scale_up", f"{cluster}: {model}/{tier} {current} -> {target} replicas")
        elif target < current:
            view = snapshot.clusters.get(cluster)
            loads = {w.worker_id: w.in_flight for w in view.workers} if view else {}
            # Replicas still starting go first, then the least busy.
            victims = sorted(live, key=lambda r: (r.ready, loads.get(r.worker_id, 0), r.name))
            for replica in victims[: current - target]:
                self._start_drain(actuator, replica, why=f"{current} -> {target} replicas")

    def _start_drain(self, actuator: Actuator, replica: Replica, *, why: str) -> None:
        key = (actuator.cluster, replica.name)
        self._draining.add(key)
        task = asyncio.create_task(self._drain_and_remove(actuator, replica, why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain_and_remove(self, actuator: Actuator, replica: Replica, why: str) -> bool:
        """Drain (when it serves), then remove; True when nothing was left in flight."""
        cluster = actuator.cluster
        drained = True
        try:
            if replica.ready and replica.address:
                try:
                    response = await self._clients.drain(replica.address, self._drain_timeout_s)
                    drained = response.drained
                    if not drained:
                        self._event(
                            "drain",
                            f"{cluster}: {replica.name} still had {response.remaining_requests} "
                            f"requests after {self._drain_timeout_s:g} s; stopping it anyway",
                        )
                except grpc.aio.AioRpcError as e:
                    drained = False
                    self._event(
                        "drain", f"{cluster}: {replica.name} did not answer Drain ({e.code().name})"
                    )
            await actuator.remove(replica.model, replica.tier, [replica.name])
            self._event(
                "scale_down",
                f"{cluster}: drained and removed {replica.name} "
                f"({replica.model}/{replica.tier}, {why})",
            )
        except ActuatorError as e:
            self._event("error", f"{cluster}: removing {replica.name} failed: {e}")
            drained = False
        finally:
            self._draining.discard((cluster, replica.name))
        return drained

    def _is_draining(self, cluster: str, replica: Replica) -> bool:
        return (cluster, replica.name) in self._draining

    # -- what the registry says --------------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        datacenters = await self._discovery.datacenters()
        names = sorted(set(datacenters) | set(self._actuators))
        _, cordon_entries = await self._discovery.kv_list(kv_keys.CORDON_PREFIX)
        cordoned = {e.key.removeprefix(kv_keys.CORDON_PREFIX) for e in cordon_entries}
        clusters = {}
        for name in names:
            actuator = self._actuators.get(name)
            view = ClusterView(
                name,
                cordoned=name in cordoned,
                capacity=actuator.capacity if actuator else 0,
            )
            if name in datacenters:
                await self._observe_cluster(view)
            else:
                view.reachable = False
            clusters[name] = view
        return Snapshot(clusters, await self._desired(), await self._pinned())

    async def _observe_cluster(self, view: ClusterView) -> None:
        try:
            _, routers = await self._discovery.healthy("kvmesh-router", datacenter=view.name)
            workers: list[WorkerView] = []
            for tier in TIERS:
                _, instances = await self._discovery.healthy(f"kvmesh-{tier}", datacenter=view.name)
                workers += [
                    WorkerView(
                        worker_id=i.meta.get("worker_id", i.service_id),
                        cluster=view.name,
                        model=i.model,
                        tier=tier,
                        address=i.grpc_address,
                    )
                    for i in instances
                ]
        except DiscoveryError as e:
            log.warning("cluster unreachable", cluster=view.name, error=str(e))
            view.reachable = False
            return
        view.router_models = {r.model for r in routers}
        view.healthy = bool(routers)
        loads = await self._clients.loads(w.address for w in workers)
        view.workers = [
            WorkerView(w.worker_id, w.cluster, w.model, w.tier, w.address, loads.get(w.address))
            for w in workers
        ]

    async def _desired(self) -> dict[Pair, int]:
        _, entries = await self._discovery.kv_list(kv_keys.DESIRED_PREFIX)
        desired = {}
        for entry in entries:
            pair = kv_keys.split_model_tier(entry.key, kv_keys.DESIRED_PREFIX)
            value = _json_int(entry.value, "desired")
            if pair is None or pair[1] not in TIERS or value is None:
                log.warning("ignoring a malformed desired key", key=entry.key)
                continue
            desired[pair] = value
        return desired

    async def _pinned(self) -> dict[tuple[str, str, str], int]:
        _, entries = await self._discovery.kv_list(kv_keys.PINNED_PREFIX)
        pinned = {}
        for entry in entries:
            rest, _, cluster = entry.key.removeprefix(kv_keys.PINNED_PREFIX).rpartition("/")
            model, _, tier = rest.rpartition("/")
            value = _json_int(entry.value, "replicas")
            if not model or tier not in TIERS or not cluster or value is None:
                log.warning("ignoring a malformed pinned key", key=entry.key)
                continue
            pinned[(model, tier, cluster)] = value
        return pinned

    # -- admin operations --------------------------------------------------------------------------

    async def clusters(self) -> list[ClusterView]:
        return list((await self._read_snapshot()).clusters.values())

    async def workers(self, cluster: str = "") -> list[WorkerView]:
        snapshot = await self._read_snapshot()
        if cluster and cluster not in snapshot.clusters:
            raise NotFoundError(f"no cluster {cluster!r}; known: {_names(snapshot.clusters)}")
        return [
            w
            for view in snapshot.clusters.values()
            if not cluster or view.name == cluster
            for w in view.workers
        ]

    async def deployments(self) -> list[DeploymentView]:
        snapshot = await self._read_snapshot()
        ready: dict[tuple[str, str, str], int] = {}
        for view in snapshot.clusters.values():
            for w in view.workers:
                key = (w.model, w.tier, view.name)
                ready[key] = ready.get(key, 0) + 1
        keys = sorted(set(self._placed) | set(ready) | set(snapshot.pinned))
        return [
            DeploymentView(
                model,
                tier,
                cluster,
                desired=snapshot.pinned.get(
                    (model, tier, cluster), self._placed.get((model, tier, cluster), 0)
                ),
                ready=ready.get((model, tier, cluster), 0),
                pinned=(model, tier, cluster) in snapshot.pinned,
            )
            for model, tier, cluster in keys
        ]

    async def scale(
        self, model: str, tier: str, cluster: str, replicas: int | None
    ) -> DeploymentView:
        """Pin `replicas` of (model, tier) in `cluster` (None: unpin, back to the autoscaler)."""
        if not model:
            raise InvalidRequestError("model must not be empty")
        if tier not in TIERS:
            raise InvalidRequestError(f"tier must be prefill or decode, not {tier!r}")
        snapshot = await self._read_snapshot()
        if not cluster:
            if len(self._actuators) != 1:
                raise InvalidRequestError(f"name a cluster to scale: {_names(self._actuators)}")
            cluster = next(iter(self._actuators))
        actuator = self._actuators.get(cluster)
        if actuator is None:
            raise NotFoundError(
                f"cluster {cluster!r} has no actuator here; scalable: {_names(self._actuators)}"
            )
        if replicas is not None and replicas > actuator.capacity:
            raise InvalidRequestError(
                f"replicas ({replicas}) exceed cluster {cluster}'s capacity ({actuator.capacity})"
            )
        key = kv_keys.pinned_key(model, tier, cluster)
        try:
            if replicas is None:
                await self._discovery.kv_delete(key)
                self._event("unpin", f"{cluster}: {model}/{tier} back to the autoscaler")
            else:
                await self._discovery.kv_put(key, json.dumps({"replicas": replicas}))
                self._event("pin", f"{cluster}: {model}/{tier} pinned at {replicas}")
        except DiscoveryError as e:
            raise UnavailableError(f"the registry is unavailable: {e}") from e
        await self.reconcile()
        ready = sum(
            1
            for w in snapshot.clusters.get(cluster, ClusterView(cluster)).workers
            if (w.model, w.tier) == (model, tier)
        )
        desired = self._placed.get((model, tier, cluster), replicas or 0)
        return DeploymentView(model, tier, cluster, desired, ready, pinned=replicas is not None)

    async def drain_worker(self, worker_id: str) -> bool:
        """Drain one worker and remove it; the reconciler replaces it when it is still needed.
        A worker no actuator owns is drained only (it stays up, NOT_SERVING)."""
        if not worker_id:
            raise InvalidRequestError("worker_id must not be empty")
        for cluster, actuator in self._actuators.items():
            for model, tier in self._owned_pairs(cluster):
                for replica in await actuator.replicas(model, tier):
                    if replica.worker_id == worker_id and not self._is_draining(cluster, replica):
                        self._draining.add((cluster, replica.name))
                        self._event("drain", f"{cluster}: draining {worker_id} (operator)")
                        return await self._drain_and_remove(actuator, replica, "operator")
        for worker in await self.workers():
            if worker.worker_id == worker_id:
                self._event("drain", f"{worker.cluster}: draining {worker_id} (not ours: kept up)")
                try:
                    response = await self._clients.drain(worker.address, self._drain_timeout_s)
                except grpc.aio.AioRpcError as e:
                    raise UnavailableError(
                        f"worker {worker_id} did not answer: {e.details()}"
                    ) from e
                return response.drained
        raise NotFoundError(f"no worker {worker_id!r} in any cluster")

    def _owned_pairs(self, cluster: str) -> set[Pair]:
        return {(m, t) for m, t, c in self._placed if c == cluster}

    async def cordon(self, cluster: str, cordoned: bool) -> ClusterView:
        """Cordon: no new requests (the edge skips it) and its replicas drained and placed
        elsewhere; uncordon undoes both."""
        snapshot = await self._read_snapshot()
        if cluster not in snapshot.clusters:
            raise NotFoundError(f"no cluster {cluster!r}; known: {_names(snapshot.clusters)}")
        try:
            if cordoned:
                await self._discovery.kv_put(
                    kv_keys.cordon_key(cluster), json.dumps({"time": self._clock()})
                )
            else:
                await self._discovery.kv_delete(kv_keys.cordon_key(cluster))
        except DiscoveryError as e:
            raise UnavailableError(f"the registry is unavailable: {e}") from e
        self._event(
            "cordon" if cordoned else "uncordon",
            f"{cluster} {'cordoned' if cordoned else 'uncordoned'}",
        )
        await self.reconcile()
        view = snapshot.clusters[cluster]
        view.cordoned = cordoned
        return view

    def events(self, limit: int = 50) -> list[Event]:
        return list(self._events)[: min(limit or 50, EVENTS_KEPT)]

    async def _read_snapshot(self) -> Snapshot:
        try:
            return await self.snapshot()
        except DiscoveryError as e:
            raise UnavailableError(f"the registry is unavailable: {e}") from e

    def _event(self, kind: str, message: str) -> None:
        self._events.appendleft(Event(self._clock(), kind, message))
        log.info("control plane event", kind=kind, message=message)


def _json_int(value: bytes | None, field_name: str) -> int | None:
    try:
        number = json.loads(value or b"")[field_name]
    except (ValueError, KeyError, TypeError):
        return None
    return number if isinstance(number, int) and number >= 0 else None


def _names(items: Mapping[str, object]) -> str:
    return ", ".join(sorted(items)) or "none"
