"""The prefill workers a decode worker reads from: their channels, lease releases, and (with
kvmesh's own transfer, TransferMode.MESH) their NIXL metadata, fetched once each."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import structlog

from kvmesh.api.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from kvmesh.kv.transfer.types import KvRegion
from kvmesh.rpc import open_channel
from kvmesh.rpc.errors import from_rpc_error

if TYPE_CHECKING:
    from kvmesh.kv.transfer.agent import KvTransferAgent

log = structlog.get_logger(__name__)


class PeerDirectory:
    def __init__(self, agent: Callable[[], KvTransferAgent]) -> None:
        self._agent = agent  # asked for only when a peer's NIXL metadata is needed
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._peers: dict[str, str] = {}  # worker id -> NIXL agent name
        self._locks: dict[str, asyncio.Lock] = {}

    async def peer(self, worker_id: str, address: str) -> str:
        """The NIXL agent name of a prefill worker, fetching its metadata on first use."""
        known = self._peers.get(worker_id)
        if known is not None:
            return known
        lock = self._locks.setdefault(worker_id, asyncio.Lock())
        async with lock:
            if worker_id in self._peers:
                return self._peers[worker_id]
            stub = worker_pb2_grpc.KvTransferStub(self.channel(address))
            try:
                meta = await stub.GetAgentMetadata(worker_pb2.GetAgentMetadataRequest(), timeout=10)
            except grpc.aio.AioRpcError as e:
                raise from_rpc_error(e) from e
            region = KvRegion(
                agent_name=meta.agent_name,
                metadata=meta.metadata,
                layout_fingerprint=meta.layout_fingerprint,
                block_size=meta.block_size,
                base_address=meta.base_address,
                bytes_per_block=meta.bytes_per_block,
                num_blocks=meta.num_blocks,
                device_id=meta.device_id,
                memory_type=meta.memory_type,
            )
            name: str = self._agent().add_peer(region)
            self._peers[worker_id] = name
            log.info("added NIXL peer", worker_id=worker_id, agent=name)
            return name

    def forget(self, worker_id: str) -> None:
        """A peer whose reads fail (restarted, dead) is fetched afresh next time."""
        name = self._peers.pop(worker_id, None)
        if name is not None:
            self._agent().remove_peer(name)

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, wait_for_ready=False)
        return channel

    async def release_lease(self, handle: common_pb2.KvHandle) -> None:
        stub = worker_pb2_grpc.KvTransferStub(self.channel(handle.grpc_address))
        request = worker_pb2.ReleaseLeaseRequest(
            request_id=handle.request_id, release_token=handle.release_token
        )
        try:
            await stub.ReleaseLease(request, timeout=5)
        except grpc.aio.AioRpcError as e:  # the lease will expire instead
            log.warning("lease release failed", request_id=handle.request_id, error=e.details())

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()
