"""`KvTransferAgent`: one NIXL agent over one paged KV cache (see the package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch

from kvmesh.kv.cache import KvLayout, PagedKvCache
from kvmesh.kv.convert import read_raw_blocks, tokens_of, write_converted
from kvmesh.kv.errors import LayoutMismatchError, TransferError
from kvmesh.kv.layout import compatible
from kvmesh.kv.transfer._nixl import (
    LOCAL_AGENT,
    as_name,
    block_descriptors,
    forget_remote,
    is_disconnect,
    memory_of,
    new_agent,
)
from kvmesh.kv.transfer.types import KvRegion, TransferResult, TransferStats

log = structlog.get_logger(__name__)

_MEMORY_TYPES = ("DRAM", "VRAM")
# Polling: bare yields for the first millisecond (a GPU copy of a few hundred MB ends inside
# it, and epoll would round any shorter sleep up to 1 ms), then sleeps doubling up to 1 ms.
_SPIN_S = 1e-3
_FIRST_DELAY_S = 50e-6
_MAX_DELAY_S = 1e-3
DEFAULT_STAGING_BYTES = 64 << 20  # where blocks of another layout land before conversion


@dataclass(slots=True)
class _Peer:
    region: KvRegion
    blocks: Any  # NIXL prepped descriptor list over every block of the peer
    layout: KvLayout | None  # None: ours (blocks copy as they are); else converted on read


class KvTransferAgent:
    """One NIXL agent over one paged KV cache: serves its blocks to peers and reads theirs.

    Peers READ the blocks of `export_cache` when one is given (exports in another dtype,
    `kvmesh.engine.exports`), else of `kv_cache`. Blocks of a peer whose layout differs from
    ours (block size, dtype: `kvmesh.kv.layout`) are READ into a staging area of
    `staging_bytes`, then converted into the cache (`read_converted`), a chunk at a time.
    """

    def __init__(
        self,
        name: str,
        kv_cache: PagedKvCache,
        *,
        export_cache: PagedKvCache | None = None,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        backends: Sequence[str] = ("UCX",),
        progress_thread: bool = False,
    ) -> None:
        tensor = kv_cache.tensor
        assert tensor.is_contiguous(), "the paged KV cache is allocated as one contiguous tensor"
        self.name = name
        self.kv_cache = kv_cache
        self.served = export_cache or kv_cache  # the blocks peers read
        self.stats = TransferStats()
        self._bytes_per_block = kv_cache.layout.bytes_per_block
        self._staging = torch.empty(staging_bytes, dtype=torch.uint8, device=tensor.device)
        self._staging_lists: dict[int, Any] = {}  # bytes per block -> prepped descriptors
        self._staging_lock = asyncio.Lock()
        self._memory_type, self._device_id = memory_of(tensor.get_device())
        if tensor.is_cuda:
            # UCX's CUDA transports work in the calling thread's current context.
            torch.cuda.set_device(tensor.device)
        self._peers: dict[str, _Peer] = {}
        self._agent: Any = None  # set once registration succeeded; None again after close()
        self._in_flight: set[Any] = set()
        self._unreleased: list[Any] = []  # handles NIXL could not cancel yet; retried on close
        self._notifications: list[tuple[str, bytes]] = []  # received, not yet taken
        agent = new_agent(name, backends, progress_thread, vram=tensor.is_cuda)
        regions = [tensor, self._staging]
        if self.served is not kv_cache:
            regions.append(self.served.tensor)
        self._registrations: list[Any] = []
        try:
            for region in regions:
                self._registrations.append(agent.register_memory(region))
        except Exception as e:
            self._deregister(agent)
            raise TransferError(f"cannot register the KV cache with NIXL: {e}") from e
        try:
            self._local_blocks: Any = agent.prep_xfer_dlist(
                LOCAL_AGENT,
                block_descriptors(
                    tensor.data_ptr(), self._bytes_per_block, kv_cache.num_blocks, self._device_id
                ),
                self._memory_type,
            )
            # Taken after registration: the metadata carries the registered regions' keys.
            self._metadata = bytes(agent.get_agent_metadata())
        except Exception as e:
            self._deregister(agent)
            raise TransferError(f"cannot describe the KV cache's blocks to NIXL: {e}") from e
        self._agent = agent
        log.info(
            "kv_transfer_agent_started",
            agent=name,
            memory_type=self._memory_type,
            device_id=self._device_id,
            num_blocks=kv_cache.num_blocks,
            bytes_per_block=self._bytes_per_block,
            served_layout=self.served.layout.fingerprint(),
        )

    def __enter__(self) -> KvTransferAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(self._peers)

    def region(self) -> KvRegion:
        self._open_agent()
        served = self.served
        return KvRegion(
            agent_name=self.name,
            metadata=self._metadata,
            layout_fingerprint=served.layout.fingerprint(),
            block_size=served.layout.block_size,
            base_address=served.tensor.data_ptr(),
            bytes_per_block=served.layout.bytes_per_block,
            num_blocks=served.num_blocks,
            device_id=self._device_id,
            memory_type=self._memory_type,
        )

    def peer_layout(self, peer: str) -> str:
        """The layout fingerprint of the blocks a peer serves."""
        return self._peer(peer).region.layout_fingerprint

    def add_peer(self, region: KvRegion) -> str:
        """Make a peer's blocks readable; returns its name. Cheap when already added.

        A region that differs from the one added under the same name (the peer restarted with
        new metadata) replaces it.
        """
        agent = self._open_agent()
        known = self._peers.get(region.agent_name)
        if known is not None:
            if known.region == region:
                return region.agent_name
            self.remove_peer(region.agent_name)
        layout = self._check_compatible(region)
        try:
            loaded = as_name(agent.add_remote_agent(region.metadata))
        except Exception as e:
            raise TransferError(f"cannot load NIXL metadata of {region.agent_name!r}: {e}") from e
        if loaded != region.agent_name:
            if loaded not in self._peers and loaded != self.name:
                forget_remote(agent, loaded)
            raise TransferError(f"metadata of {region.agent_name!r} names agent {loaded!r}")
        try:
            blocks = agent.prep_xfer_dlist(
                region.agent_name,
                block_descriptors(
                    region.base_address, region.bytes_per_block, region.num_blocks, region.device_id
                ),
                region.memory_type,
            )
        except Exception as e:
            forget_remote(agent, region.agent_name)
            raise TransferError(
                f"blocks of {region.agent_name!r} are not in its registered memory: {e}"
            ) from e
        self._peers[region.agent_name] = _Peer(region, blocks, layout)
        try:
            agent.make_connection(region.agent_name)  # starts the wireup; the first READ ends it
        except Exception as e:
            log.debug("kv_peer_not_preconnected", peer=region.agent_name, error=str(e))
        log.info("kv_peer_added", peer=region.agent_name, num_blocks=region.num_blocks)
        return region.agent_name

    async def read_blocks(
        self,
        peer: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        *,
        notify: bytes = b"",
        timeout_s: float = 30.0,
    ) -> TransferResult:
        """Copy the peer's blocks `remote_block_ids[i]` into our `local_block_ids[i]`, one READ.

        `notify` reaches the peer once the READ has completed; with no blocks to read it is sent
        on its own, so the peer can still release its lease.

        On VRAM, NIXL copies on CUDA streams of its own: writes to the blocks on both sides (the
        owner's prefill, any local write) must have finished before the READ starts; once this
        returns, the blocks are whole for any stream.

        Raises `ValueError` for ids out of range or repeated local ids, and `TransferError` for
        an unknown peer, a failed transfer, or none completed within `timeout_s`. A peer that
        NIXL reports disconnected is dropped (add it again with fresh metadata).
        """
        if len(remote_block_ids) != len(local_block_ids):
            raise ValueError(
                f"{len(remote_block_ids)} remote blocks for {len(local_block_ids)} local blocks"
            )
        if len(local_block_ids) == 0 and not notify:
            return TransferResult(0, 0, 0.0)
        known = self._peer(peer)
        if known.layout is not None:
            raise LayoutMismatchError(
                f"peer {peer!r} writes {known.region.layout_fingerprint}, not this cache's "
                f"layout: read_converted"
            )
        if len(local_block_ids) == 0:
            self._notify(peer, notify)
            return TransferResult(0, 0, 0.0)
        remote = _indices(remote_block_ids, known.region.num_blocks, "remote")
        local = _indices(local_block_ids, self.kv_cache.num_blocks, "local")
        if len(np.unique(local)) != len(local):
            raise ValueError("a local block appears twice in one read")
        started = time.perf_counter()
        await self._read(known, self._local_blocks, local, remote, notify, timeout_s)
        return self._count(len(local), len(local) * self._bytes_per_block, started)

    async def read_converted(
        self,
        peer: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        *,
        skip: int,
        num_tokens: int,
        notify: bytes = b"",
        timeout_s: float = 30.0,
    ) -> TransferResult:
        """Copy `num_tokens` tokens' KV from the peer's blocks, starting `skip` tokens into
        `remote_block_ids[0]`, into our `local_block_ids` from their first slot, converting
        the peer's layout (block size, dtype) into ours.

        The blocks are READ as they are into the staging area, as many as it holds at a time,
        and converted on this cache's device; `notify` goes with the last READ. Raises as
        `read_blocks` does, and TransferError if the staging area cannot hold one block.
        """
        known = self._peer(peer)
        source = known.layout or self.kv_cache.layout
        local_size = self.kv_cache.layout.block_size
        if len(local_block_ids) != -(-num_tokens // local_size):
            raise ValueError(f"{len(local_block_ids)} local blocks for {num_tokens} tokens")
        if len(remote_block_ids) != -(-(skip + num_tokens) // source.block_size):
            raise ValueError(f"{len(remote_block_ids)} remote blocks for {num_tokens} tokens")
        _indices(local_block_ids, self.kv_cache.num_blocks, "local")
        if num_tokens == 0:
            if notify:
                self._notify(peer, notify)
            return TransferResult(0, 0, 0.0)
        bytes_per_block = source.bytes_per_block
        slots = self._staging.numel() // bytes_per_block
        if slots == 0:
            raise TransferError(
                f"the staging area ({self._staging.numel()} bytes) cannot hold one block of "
                f"{known.region.layout_fingerprint} ({bytes_per_block} bytes)"
            )
        remote = _indices(remote_block_ids, known.region.num_blocks, "remote")
        started = time.perf_counter()
        async with self._staging_lock:
            staging = self._staging_list(bytes_per_block, slots)
            written = 0
            for first in range(0, len(remote), slots):
                chunk = remote[first : first + slots]
                last = first + len(chunk) >= len(remote)
                local = np.arange(len(chunk), dtype=np.int32)
                await self._read(known, staging, local, chunk, notify if last else b"", timeout_s)
                raw = self._staging[: len(chunk) * bytes_per_block].view(len(chunk), -1)
                start = skip if first == 0 else 0
                count = min(len(chunk) * source.block_size - start, num_tokens - written)
                tokens = tokens_of(read_raw_blocks(raw, source), start, count)
                write_converted(self.kv_cache, list(local_block_ids), written, tokens)
                written += count
            if self.kv_cache.device.type == "cuda":
                torch.cuda.current_stream(self.kv_cache.device).synchronize()
        return self._count(len(remote), len(remote) * bytes_per_block, started)

    async def _read(
        self,
        known: _Peer,
        local_list: Any,
        local: np.ndarray[Any, Any],
        remote: np.ndarray[Any, Any],
        notify: bytes,
        timeout_s: float,
    ) -> None:
        """One READ of the peer's `remote` descriptors into our `local` ones, awaited."""
        agent, peer = self._open_agent(), known.region.agent_name
        deadline = asyncio.get_running_loop().time() + timeout_s
        handle: Any = None
        disconnected = False
        try:
            try:
                handle = agent.make_prepped_xfer(
                    "READ", local_list, local, known.blocks, remote, notify
                )
                self._in_flight.add(handle)
                state = agent.transfer(handle)
            except Exception as e:
                raise TransferError(f"READ from {peer!r} could not start: {e}") from e
            await self._wait(handle, state, peer, deadline, timeout_s)
        except TransferError as e:
            self.stats.failures += 1
            disconnected = is_disconnect(e.__cause__)
            raise
        finally:
            if handle is not None:
                self._in_flight.discard(handle)
                self._release(handle)
            if disconnected:
                log.warning("kv_peer_disconnected", peer=peer)
                self.remove_peer(peer)

    def _count(self, num_blocks: int, num_bytes: int, started: float) -> TransferResult:
        seconds = time.perf_counter() - started
        result = TransferResult(num_blocks, num_bytes, seconds)
        self.stats.transfers += 1
        self.stats.blocks_read += num_blocks
        self.stats.bytes_read += num_bytes
        self.stats.seconds += seconds
        return result

    def _peer(self, peer: str) -> _Peer:
        self._open_agent()
        known = self._peers.get(peer)
        if known is None:
            raise TransferError(f"unknown peer {peer!r}: add_peer first")
        return known

    def _staging_list(self, bytes_per_block: int, slots: int) -> Any:
        """The staging area described as `slots` blocks of `bytes_per_block`, prepped once."""
        prepped = self._staging_lists.get(bytes_per_block)
        if prepped is None:
            prepped = self._open_agent().prep_xfer_dlist(
                LOCAL_AGENT,
                block_descriptors(
                    self._staging.data_ptr(), bytes_per_block, slots, self._device_id
                ),
                self._memory_type,
            )
            self._staging_lists[bytes_per_block] = prepped
        return prepped

    def take_notifications(self) -> list[tuple[str, bytes]]:
        """(peer agent name, message) pairs received since the last call, oldest first per peer."""
        self._progress()
        taken, self._notifications = self._notifications, []
        return taken

    async def serve(self, *, interval_s: float = 1e-3) -> None:
        """Progress NIXL every `interval_s` until closed or cancelled; run it as a task.

        Needed on a block owner without a progress thread: peers' first READs connect and their
        notifications (which complete their READs) arrive only while this runs. Notifications
        are kept for `take_notifications()`; `interval_s` bounds the delay a READ sees.
        """
        while self._agent is not None:
            self._progress()
            await asyncio.sleep(interval_s)

    async def wait_notifications(self, *, timeout_s: float) -> list[tuple[str, bytes]]:
        """`take_notifications()`, waiting up to `timeout_s` for at least one; [] on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        delay = 0.0
        while True:
            received = self.take_notifications()
            if received or asyncio.get_running_loop().time() >= deadline:
                return received
            await asyncio.sleep(delay)
            delay = min(_MAX_DELAY_S, delay * 2 or _FIRST_DELAY_S)

    def remove_peer(self, peer: str) -> None:
        """Forget a peer and disconnect from it; unknown peers are ignored."""
        known = self._peers.pop(peer, None)
        if known is None or self._agent is None:
            return
        with contextlib.suppress(Exception):
            known.blocks.release()
        forget_remote(self._agent, peer)
        log.info("kv_peer_removed", peer=peer)

    def close(self) -> None:
        """Cancel transfers in flight, drop peers, deregister the cache. Safe to call twice."""
        agent = self._agent
        if agent is None:
            return
        for handle in list(self._in_flight):
            self._release(handle)
        self._in_flight.clear()
        for peer in list(self._peers):
            self.remove_peer(peer)
        for handle in self._unreleased:
            # Still uncancellable: NIXL's own finalizer keeps it until the agent goes.
            with contextlib.suppress(Exception):
                handle.release()
        self._unreleased.clear()
        with contextlib.suppress(Exception):
            self._local_blocks.release()
        for prepped in self._staging_lists.values():
            with contextlib.suppress(Exception):
                prepped.release()
        self._staging_lists.clear()
        self._deregister(agent)
        self._agent = None
        log.info("kv_transfer_agent_closed", agent=self.name)

    async def _wait(
        self, handle: Any, state: str, peer: str, deadline: float, timeout_s: float
    ) -> None:
        loop = asyncio.get_running_loop()
        spin_until = loop.time() + _SPIN_S
        delay = 0.0
        while state == "PROC":
            now = loop.time()
            if now >= deadline:
                raise TransferError(f"READ from {peer!r} did not complete within {timeout_s} s")
            await asyncio.sleep(delay)
            if now >= spin_until:
                delay = min(_MAX_DELAY_S, delay * 2 or _FIRST_DELAY_S)
            agent = self._agent
            if agent is None:
                raise TransferError(f"agent {self.name!r} closed during a READ from {peer!r}")
            try:
                state = agent.check_xfer_state(handle)
            except Exception as e:
                raise TransferError(f"READ from {peer!r} failed: {e}") from e
        if state != "DONE":
            raise TransferError(f"READ from {peer!r} failed (NIXL state {state})")

    def _release(self, handle: Any) -> None:
        """Release a transfer handle; NIXL cancels it first if it is still running."""
        try:
            handle.release()
        except Exception as e:
            # The local blocks may still be written: they stay unusable until NIXL lets go.
            log.warning("kv_transfer_not_cancelled", agent=self.name, error=str(e))
            self._unreleased.append(handle)

    def _progress(self) -> None:
        """Let NIXL progress, keeping the notifications that arrived."""
        agent = self._open_agent()
        try:
            received: dict[Any, list[bytes]] = agent.get_new_notifs()
        except Exception as e:
            raise TransferError(f"cannot read NIXL notifications: {e}") from e
        for name, messages in received.items():
            self._notifications += [(as_name(name), bytes(m)) for m in messages]

    def _notify(self, peer: str, message: bytes) -> None:
        try:
            self._open_agent().send_notif(peer, message)
        except Exception as e:
            raise TransferError(f"cannot notify {peer!r}: {e}") from e

    def _deregister(self, agent: Any) -> None:
        for registration in self._registrations:
            try:
                agent.deregister_memory(registration)
            except Exception as e:
                log.warning("kv_deregister_failed", agent=self.name, error=str(e))
        self._registrations.clear()

    def _check_compatible(self, region: KvRegion) -> KvLayout | None:
        """None when the peer's blocks copy as they are into ours; else their layout, which
        `read_converted` converts. LayoutMismatchError when they cannot be read here."""
        layout = self.kv_cache.layout
        ours = (layout.fingerprint(), layout.block_size, self._bytes_per_block)
        theirs = (region.layout_fingerprint, region.block_size, region.bytes_per_block)
        converted = None
        if ours != theirs:
            difference = compatible(region.layout_fingerprint, layout.fingerprint())
            if difference is None:
                converted = KvLayout.from_fingerprint(region.layout_fingerprint)
                expected = (
                    converted.fingerprint(),
                    converted.block_size,
                    converted.bytes_per_block,
                )
                if expected != theirs:
                    difference = f"its blocks are {theirs}, its layout says {expected}"
            if difference is not None:
                raise LayoutMismatchError(
                    f"peer {region.agent_name!r} has layout {theirs}, this cache has {ours}: "
                    f"{difference}"
                )
        if region.agent_name == self.name:
            raise TransferError(f"{self.name!r} cannot be its own peer")
        if region.memory_type not in _MEMORY_TYPES:
            raise TransferError(f"unknown memory type {region.memory_type!r}")
        return converted

    def _open_agent(self) -> Any:
        if self._agent is None:
            raise TransferError(f"transfer agent {self.name!r} is closed")
        return self._agent


def _indices(block_ids: Sequence[int], num_blocks: int, side: str) -> np.ndarray[Any, Any]:
    ids = np.asarray(block_ids, dtype=np.int64)
    if ids.ndim != 1 or ids.min() < 0 or ids.max() >= num_blocks:
        raise ValueError(f"{side} block ids must lie in [0, {num_blocks})")
    return ids.astype(np.int32)
