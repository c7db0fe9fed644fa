"""The workers the router can use, kept current from discovery, with their load and KV.

Each worker gets a channel, its `WorkerInfo`, a `WatchLoad` stream and a KV event follower that
keeps its entries in the prefix index (`index.py`, `kv_watch.py`). A worker that leaves
discovery loses its entries and gets no new requests at once, but its channel stays open until
the requests already sent to it end (a drained worker deregisters, then finishes them). The
router also counts what it has sent to a worker and not yet finished (`in_flight` requests,
`pending_tokens` of prefill), which reacts at once, while load reports arrive every interval.
Choosing among the workers is `policy.py`'s job.

Pairing: when a worker's `WorkerInfo` arrives, its KV layout (fingerprint and transfer mode) is
checked against every worker of the other tier (`kvmesh.kv.layout.compatible`); a prefill and
a decode worker pair up only when the decode worker can read the prefill worker's KV. Each
incompatible pair is logged once, naming both workers and the difference.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
import structlog

from kvmesh.api.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.discovery import Discovery, ServiceInstance
from kvmesh.kv.layout import LayoutSpec, compatible, parse
from kvmesh.rpc import open_channel
from kvmesh.telemetry import metrics
from kvmesh.tiers import TIERS
from services.router.index import PrefixIndex
from services.router.kv_watch import KvEventFollower
from services.router.outliers import OutlierDetector

log = structlog.get_logger(__name__)

_LEFT_WORKER_GRACE_S = 600.0  # a worker that left keeps its channel this long for its requests


@dataclass(eq=False, slots=True)
class Worker:
    worker_id: str
    tier: str
    address: str
    channel: grpc.aio.Channel
    info: worker_pb2.WorkerInfo | None = None
    meta: dict[str, str] = field(default_factory=dict)  # its discovery meta
    load: worker_pb2.LoadReport = field(default_factory=worker_pb2.LoadReport)
    in_flight: int = 0
    pending_tokens: int = 0  # prompt tokens sent to prefill here and not yet returned
    watcher: asyncio.Task[None] | None = None
    kv_follower: asyncio.Task[None] | None = None
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while in_flight == 0

    @property
    def layout(self) -> LayoutSpec | None:
        """Its KV layout: the fingerprint from `info`, the transfer mode from discovery."""
        if self.info is None:
            return None
        return parse(self.info.layout_fingerprint, transfer_mode=self.meta.get("transfer_mode"))

    @property
    def prefill(self) -> worker_pb2_grpc.PrefillAsyncStub:
        return worker_pb2_grpc.PrefillStub(self.channel)

    @property
    def decode(self) -> worker_pb2_grpc.DecodeAsyncStub:
        return worker_pb2_grpc.DecodeStub(self.channel)

    def begin(self, prefill_tokens: int = 0) -> None:
        """A request was sent here (with this many prompt tokens to prefill)."""
        self.in_flight += 1
        self.idle.clear()
        self.pending_tokens += prefill_tokens
        metrics.ROUTER_WORKER_IN_FLIGHT.labels(self.tier, self.worker_id).set(self.in_flight)

    def end(self, prefill_tokens: int = 0) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()
        self.pending_tokens -= prefill_tokens
        metrics.ROUTER_WORKER_IN_FLIGHT.labels(self.tier, self.worker_id).set(self.in_flight)


class WorkerPool:
    def __init__(
        self,
        discovery: Discovery,
        *,
        load_interval_ms: int = 100,
        index: PrefixIndex | None = None,
        kv_stall_s: float = 5.0,
        only_workers: Iterable[str] = (),
        outliers: OutlierDetector | None = None,
    ) -> None:
        self._discovery = discovery
        self._load_interval_ms = load_interval_ms
        self.index = index if index is not None else PrefixIndex()
        self.outliers = outliers if outliers is not None else OutlierDetector()
        metrics.zero(metrics.ROUTER_EJECTIONS, *TIERS)
        self._kv_stall_s = kv_stall_s
        self._only = frozenset(only_workers)  # empty: every worker discovery lists
        self._workers: dict[str, dict[str, Worker]] = {tier: {} for tier in TIERS}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Task[None]] = set()  # channels of left workers, once idle
        self._changed = asyncio.Condition()
        # (prefill id, decode id) -> the difference that keeps them apart
        self._incompatible: dict[tuple[str, str], str] = {}

    async def start(self) -> None:
        for tier in TIERS:
            self._tasks.append(asyncio.create_task(self._follow(tier), name=f"watch-{tier}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for tier in TIERS:
            for worker in list(self._workers[tier].values()):
                await self._remove(worker, at_once=True)
        for task in list(self._closing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def workers(self, tier: str) -> list[Worker]:
        return [w for w in self._workers[tier].values() if w.info is not None]

    def candidates(
        self, tier: str, exclude: Iterable[str] = (), *, paired_with: Worker | None = None
    ) -> list[Worker]:
        """Ready workers of `tier` but `exclude` (and, given `paired_with`, only those that pair
        with it), without those ejected as outliers unless every one is."""
        excluded = set(exclude)
        ready = [
            w
            for w in self.workers(tier)
            if w.worker_id not in excluded
            and (paired_with is None or self.incompatibility(w, paired_with) is None)
        ]
        return [w for w in ready if not self.outliers.is_ejected(w.worker_id)] or ready

    def incompatibility(self, a: Worker, b: Worker) -> str | None:
        """Why a prefill and a decode worker (either order) cannot pair; None if they can."""
        prefill, decode = (a, b) if a.tier == "prefill" else (b, a)
        return self._incompatible.get((prefill.worker_id, decode.worker_id))

    async def wait_for(self, tier: str, count: int = 1, timeout_s: float = 60.0) -> None:
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: len(self.workers(tier)) >= count), timeout_s
            )

    async def _follow(self, tier: str) -> None:
        async for instances in self._discovery.watch(f"kvmesh-{tier}", wait_s=30):
            await self._reconcile(tier, instances)

    async def _reconcile(self, tier: str, instances: list[ServiceInstance]) -> None:
        current = self._workers[tier]
        seen = {i.meta.get("worker_id", i.service_id): i for i in instances}
        if self._only:
            seen = {worker_id: i for worker_id, i in seen.items() if worker_id in self._only}
        for worker_id in list(current):
            if worker_id not in seen:
                log.info("worker left", tier=tier, worker_id=worker_id)
                await self._remove(current.pop(worker_id))
        for worker_id, instance in seen.items():
            if worker_id not in current:
                worker = Worker(
                    worker_id,
                    tier,
                    instance.grpc_address,
                    open_channel(instance.grpc_address, wait_for_ready=False),
                    meta=dict(instance.meta),
                )
                current[worker_id] = worker
                worker.watcher = asyncio.create_task(self._watch_load(worker))
                follower = KvEventFollower(
                    worker_id, worker.channel, self.index, stall_s=self._kv_stall_s
                )
                worker.kv_follower = asyncio.create_task(follower.run())
                log.info("worker joined", tier=tier, worker_id=worker_id, address=worker.address)
        await self._notify()

    async def _watch_load(self, worker: Worker) -> None:
        stub = worker_pb2_grpc.WorkerStub(worker.channel)
        while True:
            try:
                worker.info = await stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=10)
                self._check_pairs(worker)
                await self._notify()
                request = worker_pb2.WatchLoadRequest(interval_ms=self._load_interval_ms)
                async for report in stub.WatchLoad(request):
                    worker.load = report
            except grpc.aio.AioRpcError as e:
                log.debug("load stream broke", worker_id=worker.worker_id, error=e.details())
            await asyncio.sleep(0.5)  # reconnect pause; discovery removes a dead worker

    def _check_pairs(self, worker: Worker) -> None:
        """Check a worker whose info just arrived against every worker of the other tier."""
        other_tier = "decode" if worker.tier == "prefill" else "prefill"
        for other in self.workers(other_tier):
            prefill, decode = (worker, other) if worker.tier == "prefill" else (other, worker)
            prefill_layout, decode_layout = prefill.layout, decode.layout
            assert prefill_layout is not None and decode_layout is not None  # both have info
            key = (prefill.worker_id, decode.worker_id)
            difference = compatible(prefill_layout, decode_layout)
            if difference is None:
                self._incompatible.pop(key, None)
                continue
            if self._incompatible.get(key) != difference:  # once per pair (and difference)
                log.warning(
                    "KV layouts incompatible: these workers will not be paired",
                    prefill_worker=prefill.worker_id,
                    decode_worker=decode.worker_id,
                    difference=difference,
                    prefill_layout=prefill_layout.fingerprint,
                    decode_layout=decode_layout.fingerprint,
                )
            self._incompatible[key] = difference

    async def _remove(self, worker: Worker, *, at_once: bool = False) -> None:
        """Forget a worker that left discovery. Its channel stays open while requests sent
        to it are in flight: a worker being drained deregisters first and then finishes them
        (a dead one fails them, which ends them just as well)."""
        for task in (worker.watcher, worker.kv_follower):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.index.remove_worker(worker.worker_id)
        self.outliers.forget(worker.worker_id)
        for key in [k for k in self._incompatible if worker.worker_id in k]:
            del self._incompatible[key]
        if worker.in_flight > 0 and not at_once:
            closing = asyncio.create_task(self._close_when_idle(worker))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        else:
            await self._close(worker)
        await self._notify()

    async def _close_when_idle(self, worker: Worker) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.idle.wait(), _LEFT_WORKER_GRACE_S)
        finally:
            await self._close(worker)

    async def _close(self, worker: Worker) -> None:
        with contextlib.suppress(KeyError):
            metrics.ROUTER_WORKER_IN_FLIGHT.remove(worker.tier, worker.worker_id)
        await worker.channel.close(None)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
