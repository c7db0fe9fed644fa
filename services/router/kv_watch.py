"""Keeps one worker's entries in the prefix index current from its KV events.

The loop: take a snapshot of the worker's cached hashes (`GetKvSnapshot`), then follow its
events from the snapshot's last id (`WatchKvEvents`). A gap (the worker dropped events we had
not read, or ids that skip) means resync from a new snapshot. Workers send an empty batch as a
heartbeat when idle; a stream silent for `stall_s`, a broken stream, or a worker that publishes
no events turns the worker approximate (see `index.py`) — said in a log line and in
`kvmesh_router_kv_index_exact` / `kvmesh_router_kv_index_fallbacks_total` — and the loop tries
again after a backoff; a successful resync makes it exact again.
"""

from __future__ import annotations

import asyncio

import grpc
import structlog

from kvmesh.api.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.kv.hashing import BlockHash
from kvmesh.telemetry import metrics
from services.router.index import PrefixIndex

log = structlog.get_logger(__name__)

_FIRST_RETRY_S = 0.5
_MAX_RETRY_S = 15.0


class _Stalled(Exception):
    pass


class _Gap(Exception):
    pass


class KvEventFollower:
    def __init__(
        self,
        worker_id: str,
        channel: grpc.aio.Channel,
        index: PrefixIndex,
        *,
        stall_s: float = 5.0,
    ) -> None:
        self.worker_id = worker_id
        self._stub = worker_pb2_grpc.WorkerStub(channel)
        self._index = index
        metrics.zero(metrics.ROUTER_KV_INDEX_FALLBACKS, "stalled", "absent", "broken")
        self._stall_s = stall_s
        self._exact: bool | None = None  # None until the first resync or fallback

    async def run(self) -> None:
        """Until cancelled (the worker left discovery: the pool cancels it and drops entries)."""
        retry_s = _FIRST_RETRY_S
        try:
            while True:
                try:
                    await self._resync()
                    retry_s = _FIRST_RETRY_S
                    await self._follow()
                except _Gap as e:
                    metrics.ROUTER_KV_EVENT_GAPS.inc()
                    log.info("kv event gap; resyncing", worker_id=self.worker_id, detail=str(e))
                    continue
                except _Stalled:
                    self._fall_back("stalled", f"no KV events or heartbeat for {self._stall_s} s")
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        self._fall_back("absent", e.details() or "the worker publishes no events")
                    else:
                        self._fall_back("broken", f"{e.code().name}: {e.details()}")
                await asyncio.sleep(retry_s)  # backoff before trying the events again
                retry_s = min(_MAX_RETRY_S, retry_s * 2)
        finally:
            if self._exact is not None:
                metrics.ROUTER_KV_INDEX_EXACT.remove(self.worker_id)

    async def _resync(self) -> None:
        snapshot: worker_pb2.KvSnapshot = await self._stub.GetKvSnapshot(
            worker_pb2.GetKvSnapshotRequest(), timeout=10
        )
        self._index.reset(
            self.worker_id, (BlockHash(h) for h in snapshot.block_hashes), snapshot.last_event_id
        )
        metrics.ROUTER_KV_INDEX_EXACT.labels(self.worker_id).set(1)
        if not self._exact:
            self._exact = True
            log.info(
                "kv index exact",
                worker_id=self.worker_id,
                blocks=len(snapshot.block_hashes),
                last_event_id=snapshot.last_event_id,
            )

    async def _follow(self) -> None:
        last = self._index.last_event_id(self.worker_id)
        call = self._stub.WatchKvEvents(worker_pb2.WatchKvEventsRequest(from_event_id=last))
        # A timer, re-armed by every message, cancels a silent stream. (Not asyncio.wait_for:
        # before Python 3.12 it can swallow this task's own cancellation.)
        loop = asyncio.get_running_loop()
        stalled = False

        def stall() -> None:
            nonlocal stalled
            stalled = True
            call.cancel()

        timer = loop.call_later(self._stall_s, stall)
        try:
            async for batch in call:
                timer.cancel()
                timer = loop.call_later(self._stall_s, stall)
                if batch.gap:
                    raise _Gap(f"events after {last} were dropped by the worker")
                for event in batch.events:
                    if event.event_id != last + 1:
                        raise _Gap(f"event {event.event_id} follows {last}")
                    last = event.event_id
                    self._apply(event)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            if stalled and not _being_cancelled():
                raise _Stalled() from None
            raise
        finally:
            timer.cancel()
            call.cancel()
        raise _Gap("the event stream ended")

    def _apply(self, event: worker_pb2.KvEvent) -> None:
        which = event.WhichOneof("event")
        if which == "stored":
            hashes = (BlockHash(h) for h in event.stored.block_hashes)
            self._index.stored(self.worker_id, event.event_id, hashes)
        elif which == "removed":
            hashes = (BlockHash(h) for h in event.removed.block_hashes)
            self._index.removed(self.worker_id, event.event_id, hashes)
        elif which == "cleared":
            self._index.cleared(self.worker_id, event.event_id)

    def _fall_back(self, reason: str, detail: str) -> None:
        self._exact = False
        metrics.ROUTER_KV_INDEX_EXACT.labels(self.worker_id).set(0)
        if self._index.make_approximate(self.worker_id, detail):
            metrics.ROUTER_KV_INDEX_FALLBACKS.labels(reason).inc()
            log.warning(
                "kv index approximate: routing this worker by its recent requests",
                worker_id=self.worker_id,
                reason=detail,
            )


def _being_cancelled() -> bool:
    """Whether this task itself was asked to stop (so a stall must not swallow that)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return bool(cancelling()) if cancelling is not None else False
