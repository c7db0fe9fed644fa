"""A cluster's routers: the ones the edge was given, or those it finds through discovery.

    fixed        `--router A,B` / `--cluster NAME=A,B`: these addresses, for good
    discovered   `--discover-routers` (with `--registry`): the passing `kvmesh-router` instances
                 of the cluster's datacenter, watched; a router that dies leaves the set when
                 its health check fails, one that starts (or restarts) joins it. Until the first
                 answer, and whenever discovery has none, the fixed addresses are used.

Each request takes the routers in turn, starting one further than the last request did (round
robin), so load spreads over them and `clusters.py` can move a request, or resume a stream, on
the next one when its router fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Mapping, Sequence

import grpc
import structlog

from kvmesh.discovery import Discovery
from kvmesh.rpc import open_channel
from services.edge.client import GenerationClient

log = structlog.get_logger(__name__)

ROUTER_SERVICE = "kvmesh-router"


class RouterSet:
    def __init__(
        self,
        *,
        request_timeout_s: float,
        probe_timeout_s: float,
        channels: Mapping[str, grpc.aio.Channel] | None = None,
        addresses: Sequence[str] = (),
        registry: str | None = None,
        datacenter: str | None = None,
    ) -> None:
        """`channels`: routers on channels the caller owns (tests); `addresses`: routers this
        set opens channels to; `registry`: discover them there (in `datacenter`, or the
        agent's own)."""
        self._timeouts = {
            "request_timeout_s": request_timeout_s,
            "probe_timeout_s": probe_timeout_s,
        }
        self._owned: dict[str, grpc.aio.Channel] = {}
        self._fixed: dict[str, GenerationClient] = {}
        for address, channel in (channels or {}).items():
            self._fixed[address] = self._client(channel)
        for address in addresses:
            if address not in self._fixed:
                self._fixed[address] = self._client(self._open(address))
        self._discovered: dict[str, GenerationClient] = {}
        self._registry = registry
        self._datacenter = datacenter
        self._watcher: asyncio.Task[None] | None = None
        self._turn = itertools.count()

    def _client(self, channel: grpc.aio.Channel) -> GenerationClient:
        return GenerationClient(channel, **self._timeouts)

    def _open(self, address: str) -> grpc.aio.Channel:
        channel = self._owned.get(address)
        if channel is None:
            channel = self._owned[address] = open_channel(address, wait_for_ready=False)
        return channel

    @property
    def addresses(self) -> list[str]:
        return list(self._discovered or self._fixed)

    def clients(self) -> list[tuple[str, GenerationClient]]:
        """Every router, starting one further than the previous call did."""
        routers = list((self._discovered or self._fixed).items())
        if not routers:
            return []
        start = next(self._turn) % len(routers)
        return routers[start:] + routers[:start]

    async def start(self) -> None:
        if self._registry is not None and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="edge-routers")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        for channel in self._owned.values():
            await channel.close(grace=None)
        self._owned.clear()

    async def _watch(self) -> None:
        assert self._registry is not None
        async with Discovery(self._registry) as discovery:
            async for instances in discovery.watch(ROUTER_SERVICE, datacenter=self._datacenter):
                found = {i.grpc_address: i for i in instances}
                if sorted(found) != sorted(self._discovered):
                    log.info(
                        "routers changed",
                        datacenter=self._datacenter,
                        routers=sorted(found),
                        was=sorted(self._discovered),
                    )
                self._discovered = {
                    address: self._discovered.get(address) or self._client(self._open(address))
                    for address in found
                }
