"""The router's KV event follower against a real gRPC Worker service on 127.0.0.1.

The worker here is scripted: the test decides its snapshot and the events it streams, so each
path of the follower (snapshot, events, gap and resync, stall, no events at all) is exercised
over a real connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from kvmesh.api.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.telemetry import metrics
from services.router.index import APPROXIMATE, EXACT, PrefixIndex
from services.router.kv_watch import KvEventFollower

HEARTBEAT_S = 0.05


class ScriptedWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self) -> None:
        self.snapshot = worker_pb2.KvSnapshot(block_hashes=[1, 2], last_event_id=10)
        self.batches: asyncio.Queue[worker_pb2.KvEventBatch | None] = asyncio.Queue()
        self.publishes_events = True
        self.snapshots_taken = 0
        self.watch_from: list[int] = []

    async def GetKvSnapshot(self, request: Any, context: Any) -> worker_pb2.KvSnapshot:
        if not self.publishes_events:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "publishes no KV events")
        self.snapshots_taken += 1
        return self.snapshot

    async def WatchKvEvents(
        self, request: worker_pb2.WatchKvEventsRequest, context: Any
    ) -> AsyncIterator[worker_pb2.KvEventBatch]:
        self.watch_from.append(request.from_event_id)
        while True:
            try:
                batch = await asyncio.wait_for(self.batches.get(), HEARTBEAT_S)
            except TimeoutError:  # idle: a heartbeat, as a real worker sends
                batch = worker_pb2.KvEventBatch(last_event_id=request.from_event_id)
            if batch is None:  # scripted silence on this stream: no events, no heartbeat
                await asyncio.Event().wait()
            assert batch is not None
            yield batch


def stored(event_id: int, *hashes: int) -> worker_pb2.KvEvent:
    return worker_pb2.KvEvent(event_id=event_id, stored=worker_pb2.BlockStored(block_hashes=hashes))


async def eventually(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)  # polling the condition, not waiting for time to pass


@pytest.fixture
async def worker() -> AsyncIterator[tuple[ScriptedWorker, str]]:
    servicer = ScriptedWorker()
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def following(address: str, index: PrefixIndex, stall_s: float = 5.0) -> AsyncIterator[None]:
    channel = grpc.aio.insecure_channel(address)
    task = asyncio.create_task(KvEventFollower("w1", channel, index, stall_s=stall_s).run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await channel.close(None)


async def test_snapshot_then_events_keep_the_index_exact(
    worker: tuple[ScriptedWorker, str],
) -> None:
    servicer, address = worker
    index = PrefixIndex()
    async with following(address, index):
        await eventually(lambda: index.mode("w1") == EXACT)
        assert index.overlap([1, 2], ["w1"]) == {"w1": 2}
        await servicer.batches.put(worker_pb2.KvEventBatch(events=[stored(11, 3)]))
        await eventually(lambda: index.last_event_id("w1") == 11)
        assert index.overlap([1, 2, 3], ["w1"]) == {"w1": 3}
        assert servicer.watch_from == [10]


async def test_a_gap_resyncs_from_a_new_snapshot(worker: tuple[ScriptedWorker, str]) -> None:
    servicer, address = worker
    index = PrefixIndex()
    gaps = metrics.ROUTER_KV_EVENT_GAPS._value.get()
    async with following(address, index):
        await eventually(lambda: servicer.snapshots_taken == 1 and index.mode("w1") == EXACT)
        servicer.snapshot = worker_pb2.KvSnapshot(block_hashes=[7, 8, 9], last_event_id=40)
        await servicer.batches.put(worker_pb2.KvEventBatch(events=[stored(12, 5)]))  # 11 lost
        await eventually(lambda: index.last_event_id("w1") == 40)
        assert index.overlap([7, 8, 9], ["w1"]) == {"w1": 3}
        assert index.overlap([1, 2], ["w1"]) == {"w1": 0}
        # The follower watches again from the new snapshot (its call may still be on the way).
        await eventually(lambda: len(servicer.watch_from) == 2)
        assert servicer.watch_from == [10, 40]
        await servicer.batches.put(worker_pb2.KvEventBatch(gap=True, last_event_id=50))
        await eventually(lambda: servicer.snapshots_taken == 3)
    assert metrics.ROUTER_KV_EVENT_GAPS._value.get() - gaps >= 2


async def test_a_stalled_stream_turns_the_worker_approximate_and_back(
    worker: tuple[ScriptedWorker, str],
) -> None:
    servicer, address = worker
    index = PrefixIndex()
    fallbacks = metrics.ROUTER_KV_INDEX_FALLBACKS.labels("stalled")._value.get()
    async with following(address, index, stall_s=0.3):
        await eventually(lambda: index.mode("w1") == EXACT)
        await servicer.batches.put(None)  # the stream goes silent
        await eventually(lambda: index.mode("w1") == APPROXIMATE)
        assert "no KV events or heartbeat" in index.reason("w1")
        assert metrics.ROUTER_KV_INDEX_EXACT.labels("w1")._value.get() == 0
        index.routed("w1", [1, 2, 3])  # routing now feeds the index
        assert index.overlap([1, 2, 3], ["w1"]) == {"w1": 3}
        # The follower retries: the next stream heartbeats, so the worker is exact again.
        await eventually(lambda: index.mode("w1") == EXACT)
        assert metrics.ROUTER_KV_INDEX_EXACT.labels("w1")._value.get() == 1
    assert metrics.ROUTER_KV_INDEX_FALLBACKS.labels("stalled")._value.get() == fallbacks + 1


async def test_a_worker_without_events_is_approximate_with_the_reason(
    worker: tuple[ScriptedWorker, str],
) -> None:
    servicer, address = worker
    servicer.publishes_events = False
    index = PrefixIndex()
    async with following(address, index):
        await eventually(lambda: index.reason("w1") == "publishes no KV events")
        assert index.mode("w1") == APPROXIMATE
