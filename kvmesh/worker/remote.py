"""Workers seen from outside: one channel per address, their load, draining them.

The autoscaler reads every worker's load each tick; the control plane lists workers with their
load and drains one before it is removed. Both keep a `WorkerClients` and call `retain()` with
the addresses still in discovery so channels to departed workers are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

import grpc

from kvmesh.api.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.rpc import open_channel

DEFAULT_LOAD_TIMEOUT_S = 2.0


class WorkerClients:
    def __init__(self, *, load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._load_timeout_s = load_timeout_s

    def _stub(self, address: str) -> worker_pb2_grpc.WorkerAsyncStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = open_channel(address, wait_for_ready=False)
            self._channels[address] = channel
        return worker_pb2_grpc.WorkerStub(channel)

    async def load(self, address: str) -> worker_pb2.LoadReport | None:
        """The worker's current load (the first report of a `WatchLoad` stream); None when it
        does not answer in time."""
        call = self._stub(address).WatchLoad(
            worker_pb2.WatchLoadRequest(), timeout=self._load_timeout_s
        )
        try:
            async for report in call:
                return report
        except grpc.aio.AioRpcError:
            return None
        finally:
            call.cancel()
        return None

    async def loads(self, addresses: Iterable[str]) -> dict[str, worker_pb2.LoadReport | None]:
        unique = list(dict.fromkeys(addresses))
        reports = await asyncio.gather(*(self.load(a) for a in unique))
        return dict(zip(unique, reports, strict=True))

    async def drain(self, address: str, timeout_s: float) -> worker_pb2.DrainResponse:
        """NOT_SERVING -> deregister -> in-flight requests finish (or `timeout_s` passes).
        Raises `grpc.aio.AioRpcError` when the worker cannot be reached."""
        request = worker_pb2.DrainRequest(timeout_ms=max(1, round(timeout_s * 1000)))
        response: worker_pb2.DrainResponse = await self._stub(address).Drain(
            request, timeout=timeout_s + 10
        )
        return response

    async def retain(self, addresses: Iterable[str]) -> None:
        """Close the channels of every address not in `addresses`."""
        keep = set(addresses)
        for address in [a for a in self._channels if a not in keep]:
            channel = self._channels.pop(address)
            with contextlib.suppress(Exception):
                await channel.close(None)

    async def close(self) -> None:
        await self.retain(())
