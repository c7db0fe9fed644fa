"""The services every worker serves, prefill or decode: `Worker` and `KvTransfer`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from kvmesh.api.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.errors import InvalidRequestError
from kvmesh.kv.events import AllCleared, BlockRemoved, BlockStored, KvEvent
from kvmesh.types import TransferMode
from kvmesh.worker.convert import load_to_proto

if TYPE_CHECKING:
    from kvmesh.worker.runtime import WorkerRuntime

_EVENT_POLL_S = 0.01
KV_EVENT_HEARTBEAT_S = 1.0  # an idle event stream sends an empty batch this often
_DEFAULT_LOAD_INTERVAL_S = 0.25
MIN_LOAD_INTERVAL_MS = 20  # a watcher cannot make a worker report more often than this


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self._runtime = runtime

    async def GetInfo(self, request: Any, context: Any) -> worker_pb2.WorkerInfo:
        return self._runtime.info()

    async def WatchKvEvents(
        self, request: worker_pb2.WatchKvEventsRequest, context: Any
    ) -> AsyncIterator[worker_pb2.KvEventBatch]:
        if not self._runtime.config.kv_events:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this worker publishes no KV events (started with --no-kv-events)",
            )
        log = self._runtime.engine.kv_events
        after = request.from_event_id
        sent_at = -1e9
        while True:
            batch = log.read_after(after)
            if batch.gap:
                yield worker_pb2.KvEventBatch(gap=True, last_event_id=batch.last_event_id)
                return  # the reader resyncs from GetKvSnapshot and watches again
            now = time.monotonic()
            if batch.events or now - sent_at >= KV_EVENT_HEARTBEAT_S:  # empty: a heartbeat
                yield worker_pb2.KvEventBatch(
                    events=[_event_to_proto(e) for e in batch.events],
                    last_event_id=batch.last_event_id,
                )
                after = batch.last_event_id
                sent_at = now
            await asyncio.sleep(_EVENT_POLL_S)  # the engine thread appends; poll its log

    async def GetKvSnapshot(self, request: Any, context: Any) -> worker_pb2.KvSnapshot:
        if not self._runtime.config.kv_events:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this worker publishes no KV events (started with --no-kv-events)",
            )
        hashes, last_event_id = await self._runtime.engine.kv_snapshot()
        return worker_pb2.KvSnapshot(block_hashes=hashes, last_event_id=last_event_id)

    async def WatchLoad(
        self, request: worker_pb2.WatchLoadRequest, context: Any
    ) -> AsyncIterator[worker_pb2.LoadReport]:
        if 0 < request.interval_ms < MIN_LOAD_INTERVAL_MS:
            raise InvalidRequestError(
                f"interval_ms must be 0 (the worker's default) or at least {MIN_LOAD_INTERVAL_MS}"
            )
        interval = request.interval_ms / 1000 if request.interval_ms else _DEFAULT_LOAD_INTERVAL_S
        while True:
            yield load_to_proto(self._runtime.engine.load())
            await asyncio.sleep(interval)

    async def Drain(
        self, request: worker_pb2.DrainRequest, context: Any
    ) -> worker_pb2.DrainResponse:
        timeout_s = request.timeout_ms / 1000 if request.timeout_ms else 30.0
        remaining = await self._runtime.drain(timeout_s)
        return worker_pb2.DrainResponse(drained=remaining == 0, remaining_requests=remaining)


class KvTransferServicer(worker_pb2_grpc.KvTransferServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self._runtime = runtime

    async def GetAgentMetadata(
        self, request: Any, context: Any
    ) -> worker_pb2.GetAgentMetadataResponse:
        region = self._runtime.transfer.region()
        return worker_pb2.GetAgentMetadataResponse(
            agent_name=region.agent_name,
            metadata=region.metadata,
            layout_fingerprint=region.layout_fingerprint,
            block_size=region.block_size,
            base_address=region.base_address,
            bytes_per_block=region.bytes_per_block,
            num_blocks=region.num_blocks,
            device_id=region.device_id,
            memory_type=region.memory_type,
            worker_id=self._runtime.worker_id,
        )

    async def ReleaseLease(
        self, request: worker_pb2.ReleaseLeaseRequest, context: Any
    ) -> worker_pb2.ReleaseLeaseResponse:
        released = await self._runtime.leases.release(request.request_id, request.release_token)
        return worker_pb2.ReleaseLeaseResponse(released=released)

    async def GetTransferStats(self, request: Any, context: Any) -> worker_pb2.TransferStats:
        runtime = self._runtime
        stats = runtime.transfer.stats if runtime.transfer_mode is TransferMode.MESH else None
        leases = runtime.leases
        return worker_pb2.TransferStats(
            bytes_received=stats.bytes_read if stats else 0,  # ENGINE: the engine's own business
            transfers=stats.transfers if stats else 0,
            active_leases=leases.active,
            pinned_blocks=self._runtime.engine.load().num_blocks_pinned,
            leases_expired=leases.stats.expired,
        )


def _event_to_proto(event: KvEvent) -> worker_pb2.KvEvent:
    if isinstance(event, BlockStored):
        stored = worker_pb2.BlockStored(block_hashes=list(event.block_hashes))
        if event.parent_hash is not None:
            stored.parent_hash = event.parent_hash
        return worker_pb2.KvEvent(event_id=event.event_id, stored=stored)
    if isinstance(event, BlockRemoved):
        removed = worker_pb2.BlockRemoved(block_hashes=list(event.block_hashes))
        return worker_pb2.KvEvent(event_id=event.event_id, removed=removed)
    assert isinstance(event, AllCleared)
    return worker_pb2.KvEvent(event_id=event.event_id, cleared=worker_pb2.AllCleared())
