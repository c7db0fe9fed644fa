"""The clusters the edge fronts, and one generation's way through them (spillover, failover).

A cluster is one Consul datacenter with one or more routers (`routers.py`: fixed addresses or
discovered). For each request the edge tries routers one at a time:

    order                  home first, then the others as configured; cordoned ones skipped
                           (every cluster cordoned: 503); within a cluster, its routers in
                           turn (round robin from request to request)
    each attempt but the   carries `x-kvmesh-spill: 1`, so that a saturated router, or one
    last                   without decode workers, refuses at once instead of queueing or
                           waiting for its tier to wake
    before the first       UNAVAILABLE or RESOURCE_EXHAUSTED: the next router, then the next
    message                cluster (spillover, failover); any other error is the answer
    after it               UNAVAILABLE (the router died, or its cluster lost every decode
                           worker): the next router or cluster resumes with
                           `resume_token_ids` = every token streamed so far, so the client
                           reads one continuous answer

Each router is tried at most once per request; the edge asks routers for token ids
(`return_token_ids`) to resume with, and strips them for a client that did not ask for them.

With a registry, cordons are watched (Consul KV `kvmesh/controlplane/cordon/<cluster>`): a
cordoned cluster gets no new requests and does not count for /health.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence, Set
from dataclasses import dataclass

import grpc
import structlog

from kvmesh.api.v1 import generation_pb2
from kvmesh.discovery import Discovery
from kvmesh.discovery.keys import CORDON_PREFIX
from kvmesh.telemetry import metrics
from services.edge import errors
from services.edge.client import GenerationClient, GenerationStream
from services.edge.errors import ApiError, RouterError
from services.edge.routers import RouterSet

log = structlog.get_logger(__name__)

_MOVE_BEFORE_FIRST_MESSAGE = {
    grpc.StatusCode.UNAVAILABLE: "failed_over",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "spilled",
}
_MOVE_MID_STREAM = {grpc.StatusCode.UNAVAILABLE: "failed_over"}


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    routers: RouterSet


class ClusterSet:
    """Every cluster, home first, and which of them are cordoned now."""

    def __init__(
        self,
        clusters: Sequence[Cluster],
        *,
        home: str,
        request_timeout_s: float,
        registry: str | None = None,
    ) -> None:
        if not clusters:
            raise ValueError("at least one cluster is required")
        self.clusters = sorted(clusters, key=lambda c: c.name != home)  # stable: home first
        self.request_timeout_s = request_timeout_s
        self._registry = registry
        self._cordoned: frozenset[str] = frozenset()
        self._cordons_changed = asyncio.Condition()
        self._watcher: asyncio.Task[None] | None = None
        outcomes = ("served", "spilled", "failed_over", "error", "cancelled")
        metrics.zero(
            metrics.EDGE_CLUSTER_REQUESTS, *((c.name, o) for c in self.clusters for o in outcomes)
        )

    @property
    def cordoned(self) -> frozenset[str]:
        return self._cordoned

    def available(self) -> list[Cluster]:
        """The clusters that take new requests, in the order they are tried."""
        return [c for c in self.clusters if c.name not in self._cordoned]

    def generate(self, request: generation_pb2.GenerateRequest) -> ClusterStream:
        if not self.available():
            raise errors.all_cordoned(request.request_id)
        return ClusterStream(self, request)

    # -- /v1/models and /health ------------------------------------------------------------------

    async def list_models(self, *, request_id: str) -> list[generation_pb2.ModelInfo]:
        """The models of the first cluster that answers (those taking requests first)."""
        cordoned = [c for c in self.clusters if c.name in self._cordoned]
        failure: ApiError | None = None
        for cluster in self.available() + cordoned:
            for _, client in cluster.routers.clients():
                try:
                    return await client.list_models(request_id=request_id)
                except ApiError as e:
                    failure = e
        if failure is None:
            raise errors.no_router(request_id)
        raise failure

    async def unready_reason(self, *, request_id: str) -> str | None:
        """None when some cluster that takes requests can serve one; else why none can."""
        available = self.available()
        reasons = await asyncio.gather(*(_cluster_unready(c, request_id) for c in available))
        if any(reason is None for reason in reasons):
            return None
        if len(self.clusters) == 1:
            return reasons[0] if reasons else "the cluster is cordoned"
        why = dict(zip((c.name for c in available), reasons, strict=True))
        return "; ".join(f"{c.name}: {why.get(c.name) or 'cordoned'}" for c in self.clusters)

    # -- cordons -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Watch cordons, when there is a registry to watch, and discovered routers."""
        for cluster in self.clusters:
            await cluster.routers.start()
        if self._registry is not None and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch_cordons(), name="edge-cordons")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        for cluster in self.clusters:
            await cluster.routers.stop()

    async def wait_for_cordons(self, expected: Set[str], timeout_s: float = 10.0) -> None:
        """Until exactly `expected` are cordoned (the watch has caught up with the registry)."""
        async with self._cordons_changed:
            await asyncio.wait_for(
                self._cordons_changed.wait_for(lambda: self._cordoned == expected), timeout_s
            )

    async def _watch_cordons(self) -> None:
        assert self._registry is not None
        names = {c.name for c in self.clusters}
        async with Discovery(self._registry) as discovery:
            async for entries in discovery.kv_watch(CORDON_PREFIX):
                cordoned = frozenset(e.key.removeprefix(CORDON_PREFIX) for e in entries) & names
                if cordoned != self._cordoned:
                    log.info("cordoned clusters changed", cordoned=sorted(cordoned))
                async with self._cordons_changed:
                    self._cordoned = cordoned
                    self._cordons_changed.notify_all()


class ClusterStream:
    """One generation across clusters, read like one router's stream: `next()`, `cancel()`."""

    def __init__(self, clusters: ClusterSet, request: generation_pb2.GenerateRequest) -> None:
        self.request_id = request.request_id
        self._clusters = clusters
        self._untried = list(clusters.available())
        self._cluster: Cluster | None = None  # the cluster whose routers are being tried
        self._routers: list[tuple[str, GenerationClient]] = []  # its routers not yet tried
        self._request = generation_pb2.GenerateRequest()
        self._request.CopyFrom(request)
        self._request.return_token_ids = True  # to resume with, should the stream break
        self._client_wants_token_ids = request.return_token_ids
        self._streamed: list[int] = []
        self.last_tokens = 0  # how many tokens the last message carried (ids stripped or not)
        self._deadline = asyncio.get_running_loop().time() + clusters.request_timeout_s
        self._attempt: _Attempt | None = None

    async def next(self) -> generation_pb2.GenerateResponse | None:
        """The next message of the answer; None once it is complete."""
        while True:
            attempt = self._attempt or self._start()
            try:
                message = await attempt.stream.next()
            except RouterError as e:
                self._attempt = None
                outcome, to = self._move_on(attempt, e)
                attempt.end(outcome or "error")
                if outcome is None:
                    raise
                log.info(
                    "generation moves to another router",
                    request_id=self.request_id,
                    from_cluster=attempt.cluster.name,
                    from_router=attempt.router,
                    to=to,
                    outcome=outcome,
                    why=e.upstream,
                    resumed_tokens=len(self._streamed),
                )
                continue
            if message is None:
                self._attempt = None
                attempt.end("served")
                return None
            attempt.received = True
            self.last_tokens = len(message.token_ids)
            self._streamed += message.token_ids
            if not self._client_wants_token_ids:
                del message.token_ids[:]
            return message

    def cancel(self) -> None:
        """End the router call in progress, if any; safe once the answer has ended."""
        if self._attempt is not None:
            self._attempt.stream.cancel()
            self._attempt.end("cancelled")
            self._attempt = None

    def _start(self) -> _Attempt:
        target = self._next_router()
        if target is None:  # cordoned since `generate`, or no router is known
            if not self._clusters.available():
                raise errors.all_cordoned(self.request_id)
            raise errors.no_router(self.request_id)
        cluster, router, client = target
        is_last = self._peek() is None
        del self._request.resume_token_ids[:]
        self._request.resume_token_ids.extend(self._streamed)
        remaining_s = self._deadline - asyncio.get_running_loop().time()
        stream = client.generate(
            self._request, spill=not is_last, timeout_s=max(remaining_s, 0.001)
        )
        self._attempt = _Attempt(cluster, stream, router)
        return self._attempt

    def _next_router(self) -> tuple[Cluster, str, GenerationClient] | None:
        """The next router to try: the current cluster's next, else the next cluster's first."""
        while True:
            if self._cluster is not None and self._cluster.name in self._clusters.cordoned:
                self._routers = []
            if self._routers:
                assert self._cluster is not None
                address, client = self._routers.pop(0)
                return self._cluster, address, client
            self._cluster = self._next_cluster(take=True)
            if self._cluster is None:
                return None
            self._routers = self._cluster.routers.clients()

    def _peek(self) -> str | None:
        """Where the request would go after this attempt ("cluster/router"), if anywhere."""
        if self._routers and self._cluster is not None:
            return f"{self._cluster.name}/{self._routers[0][0]}"
        for cluster in self._untried:
            if cluster.name not in self._clusters.cordoned and cluster.routers.addresses:
                return f"{cluster.name}/{cluster.routers.addresses[0]}"
        return None

    def _next_cluster(self, *, take: bool) -> Cluster | None:
        """The next untried cluster that is not cordoned now (removed from the list if `take`)."""
        while self._untried:
            cluster = self._untried[0]
            if cluster.name not in self._clusters.cordoned:
                if take:
                    self._untried.pop(0)
                return cluster
            self._untried.pop(0)
        return None

    def _move_on(self, attempt: _Attempt, error: RouterError) -> tuple[str | None, str]:
        """(the attempt's outcome, the next cluster) when the error sends the request on."""
        table = _MOVE_MID_STREAM if attempt.received else _MOVE_BEFORE_FIRST_MESSAGE
        outcome = table.get(error.grpc_status) if error.grpc_status else None
        following = self._peek()
        if outcome is None or following is None:
            return None, ""
        return outcome, following


@dataclass(slots=True)
class _Attempt:
    cluster: Cluster
    stream: GenerationStream
    router: str
    received: bool = False  # a message came from this router
    ended: bool = False

    def end(self, outcome: str) -> None:
        if not self.ended:
            self.ended = True
            metrics.EDGE_CLUSTER_REQUESTS.labels(self.cluster.name, outcome).inc()


async def _cluster_unready(cluster: Cluster, request_id: str) -> str | None:
    """None when one of the cluster's routers can serve a generation; else why none can."""
    routers = cluster.routers.clients()
    if not routers:
        return "no router is known"
    reasons = await asyncio.gather(*(_unready_reason(c, request_id) for _, c in routers))
    if any(reason is None for reason in reasons):
        return None
    if len(routers) == 1:
        return reasons[0]
    return "; ".join(
        f"{address}: {why}" for (address, _), why in zip(routers, reasons, strict=True)
    )


async def _unready_reason(client: GenerationClient, request_id: str) -> str | None:
    """None when this cluster can serve a generation: its router is SERVING with a decode
    worker."""
    serving, reason = await client.is_serving()
    if not serving:
        return reason
    try:
        models = await client.list_models(request_id=request_id)
    except ApiError as e:
        return f"listing the router's models failed: {e.message}"
    if not models:
        return "the router serves no model"
    if not any(m.num_decode_workers > 0 for m in models):
        return "no model has a decode worker"
    return None
