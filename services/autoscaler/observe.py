"""What the autoscaler sees of one (model, tier) each tick, across every cluster.

    replicas   passing instances of `kvmesh-<tier>` serving the model, in every datacenter
    load       each of those workers' `LoadReport` (running + waiting requests), read once a tick
    latency    every router's /metrics (its address in the registration's `metrics_port` meta):
               the TTFT and ITL histograms' new observations since the last tick, as samples at
               their bucket's upper bound (what `histogram_quantile` would assume; a bucket past
               the last bound counts at the last bound)
    wake       `kvmesh/autoscaler/wake/<model>/<tier>`, written by a router while a request
               waits for a tier with no replicas, counts while fresher than `wake_fresh_s`

A worker or router that does not answer this tick is left out of it (and a router's histogram
is read afresh when it answers again: a counter that went backwards means a restart).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

import aiohttp
import structlog

from kvmesh.discovery import Discovery, DiscoveryError, ServiceInstance
from kvmesh.discovery.keys import wake_key
from kvmesh.telemetry.scrape import scrape
from kvmesh.worker.remote import WorkerClients
from services.autoscaler.decide import LatencySample, Observation
from services.autoscaler.policy import PREFILL, TIERS

log = structlog.get_logger(__name__)

Pair = tuple[str, str]
TTFT_METRIC = "kvmesh_ttft_seconds"
ITL_METRIC = "kvmesh_itl_seconds"
DEFAULT_WAKE_FRESH_S = 10.0
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Scrape = Callable[[int, str], Awaitable[dict[str, float]]]


class MeshObserver:
    def __init__(
        self,
        discovery: Discovery,
        *,
        models: Iterable[str] = (),
        clients: WorkerClients | None = None,
        wake_fresh_s: float = DEFAULT_WAKE_FRESH_S,
        clock: Callable[[], float] = time.time,
        scrape_metrics: Scrape | None = None,
    ) -> None:
        self._discovery = discovery
        self._models = tuple(models)  # always sized, even before any replica exists
        self._clients = clients or WorkerClients()
        self._wake_fresh_s = wake_fresh_s
        self._clock = clock
        self._scrape = scrape_metrics or _scrape
        # (router service id, metric, model) -> cumulative bucket counts at the last read
        self._buckets: dict[tuple[str, str, str], list[tuple[float, float]]] = {}

    async def pairs(self) -> set[Pair]:
        found: set[Pair] = {(m, tier) for m in self._models for tier in TIERS}
        for tier in TIERS:
            found |= {(i.model, tier) for i in await self._instances(f"kvmesh-{tier}") if i.model}
        return found

    async def observe(self, model: str, tier: str) -> Observation:
        workers = [i for i in await self._instances(f"kvmesh-{tier}") if i.model == model]
        loads = await self._clients.loads(i.grpc_address for i in workers)
        reports = [r for r in loads.values() if r is not None]
        samples = await self._latency(model, TTFT_METRIC if tier == PREFILL else ITL_METRIC)
        return Observation(
            ready_replicas=len(workers),
            in_flight=sum(r.num_running for r in reports),
            queued=sum(r.num_waiting for r in reports),
            ttft=tuple(samples) if tier == PREFILL else (),
            itl=tuple(samples) if tier != PREFILL else (),
            waiting_for_wake=not workers and await self._wake_requested(model, tier),
        )

    async def close(self) -> None:
        await self._clients.close()

    async def _instances(self, service: str) -> list[ServiceInstance]:
        found: list[ServiceInstance] = []
        for datacenter in await self._discovery.datacenters():
            _, instances = await self._discovery.healthy(service, datacenter=datacenter)
            found += instances
        return found

    async def _wake_requested(self, model: str, tier: str) -> bool:
        try:
            _, entry = await self._discovery.kv_get(wake_key(model, tier))
        except DiscoveryError:
            return False
        if entry is None:
            return False
        try:
            written = float(json.loads(entry.value)["time"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed wake key", key=entry.key)
            return False
        return self._clock() - written <= self._wake_fresh_s

    async def _latency(self, model: str, metric: str) -> list[LatencySample]:
        routers = [r for r in await self._instances("kvmesh-router") if r.model == model]
        routers = [r for r in routers if r.meta.get("metrics_port", "").isdigit()]
        results = await asyncio.gather(
            *(self._scrape(int(r.meta["metrics_port"]), r.address) for r in routers),
            return_exceptions=True,
        )
        now = self._clock()
        samples: list[LatencySample] = []
        for router, result in zip(routers, results, strict=True):
            if isinstance(result, BaseException):
                log.debug("router metrics unreadable", router=router.service_id, error=str(result))
                continue
            buckets = histogram_buckets(result, metric, model)
            key = (router.service_id, metric, model)
            previous = self._buckets.get(key)
            self._buckets[key] = buckets
            if previous is None:
                continue  # the first read only sets the baseline
            samples += new_samples(previous, buckets, now)
        return samples


async def _scrape(port: int, host: str) -> dict[str, float]:
    try:
        return await scrape(port, host)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise ConnectionError(f"cannot read http://{host}:{port}/metrics: {e}") from e


def histogram_buckets(
    samples: dict[str, float], metric: str, model: str
) -> list[tuple[float, float]]:
    """[(upper bound, cumulative count)] of one histogram for `model`, by bound: its series
    for the model summed over any other label (TTFT's `tier`)."""
    prefix = metric + "_bucket{"
    buckets: dict[float, float] = {}
    for key, value in samples.items():
        if not key.startswith(prefix):
            continue
        labels = dict(_LABEL.findall(key[len(prefix) : -1]))
        if labels.get("model", model) != model or "le" not in labels:
            continue
        bound = float(labels["le"])
        buckets[bound] = buckets.get(bound, 0.0) + value
    return sorted(buckets.items())


def new_samples(
    previous: Sequence[tuple[float, float]], current: Sequence[tuple[float, float]], now: float
) -> list[LatencySample]:
    """The observations between two reads of a cumulative histogram, one sample per bucket."""
    before = dict(previous)
    if any(count < before.get(bound, 0.0) for bound, count in current):
        before = {}  # a counter went backwards: the router restarted; everything is new
    finite = [bound for bound, _ in current if not math.isinf(bound)]
    last_finite = finite[-1] if finite else 0.0
    samples = []
    below_now = below_before = 0.0
    for bound, count in current:
        in_bucket = (count - below_now) - (before.get(bound, 0.0) - below_before)
        below_now, below_before = count, before.get(bound, 0.0)
        if in_bucket >= 1:
            seconds = last_finite if math.isinf(bound) else bound
            samples.append(LatencySample(time=now, seconds=seconds, count=round(in_bucket)))
    return samples
