"""The block pool: which KV blocks are free, who references them, and the prefix cache.

Blocks are fixed-size pages of the KV cache, all allocated up front. A block is *used* while some
sequence (or a pinned export) references it. A full block can be *cached* under its chained hash;
when its last reference goes it stays cached but becomes evictable, and is reused least recently
freed first. Blocks that hold nothing cached are handed out before any cached block is evicted.

The pool only does bookkeeping; the tensors live in `kvmesh.kv.cache`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import NewType

from kvmesh.kv.errors import NoFreeBlocksError
from kvmesh.kv.events import AllCleared, BlockRemoved, BlockStored, KvEvent
from kvmesh.kv.hashing import BlockHash

BlockId = NewType("BlockId", int)


class BlockPool:
    def __init__(self, num_blocks: int, *, enable_prefix_cache: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self.enable_prefix_cache = enable_prefix_cache
        self._ref_counts = [0] * num_blocks
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, BlockId] = {}
        # Free blocks with nothing cached: used first. A list used as a stack.
        self._free_uncached: list[BlockId] = [BlockId(i) for i in reversed(range(num_blocks))]
        # Free blocks whose contents stay cached, least recently freed first.
        self._free_cached: OrderedDict[BlockId, None] = OrderedDict()
        self._events: list[KvEvent] = []
        self._next_event_id = 1

    # -- queries -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (cached ones by eviction)."""
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def is_whole(self) -> bool:
        """No block is referenced: everything handed out has come back."""
        return self.num_free_blocks == self.num_blocks and not any(self._ref_counts)

    def ref_count(self, block_id: BlockId) -> int:
        return self._ref_counts[block_id]

    def cached_hashes(self) -> list[BlockHash]:
        return list(self._cached)

    def lookup(self, hashes: Sequence[BlockHash]) -> list[BlockId]:
        """Blocks holding the longest cached prefix of `hashes`. References nothing."""
        found: list[BlockId] = []
        if not self.enable_prefix_cache:
            return found
        for block_hash in hashes:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    # -- references ----------------------------------------------------------------------------

    def allocate(self, count: int) -> list[BlockId]:
        """`count` fresh blocks, each referenced once; all or nothing."""
        if count > self.num_free_blocks:
            raise NoFreeBlocksError(f"asked for {count} blocks, {self.num_free_blocks} free")
        blocks: list[BlockId] = []
        evicted: list[BlockHash] = []
        for _ in range(count):
            if self._free_uncached:
                block_id = self._free_uncached.pop()
            else:
                block_id, _ = self._free_cached.popitem(last=False)
                evicted.append(self._uncache(block_id))
            self._ref_counts[block_id] = 1
            blocks.append(block_id)
        if evicted:
            self._emit_removed(evicted)
        return blocks

    def acquire(self, block_ids: Iterable[BlockId]) -> None:
        """Add a reference to blocks already in use or cached (prefix hits, pins)."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                assert self._hash_of[block_id] is not None, "acquiring a free, uncached block"
                del self._free_cached[block_id]
            self._ref_counts[block_id] += 1

    def release(self, block_ids: Sequence[BlockId]) -> None:
        """Drop one reference from each block.

        Release a sequence's blocks in order: the pool frees them tail first, so that the end of a
        sequence is evicted before the prefix that other requests are likelier to share.
        """
        for block_id in reversed(block_ids):
            count = self._ref_counts[block_id]
            assert count > 0, f"block {block_id} released more often than referenced"
            self._ref_counts[block_id] = count - 1
            if count == 1:
                if self._hash_of[block_id] is None:
                    self._free_uncached.append(block_id)
                else:
                    self._free_cached[block_id] = None

    # -- the prefix cache ----------------------------------------------------------------------

    def cache(
        self,
        block_ids: Sequence[BlockId],
        hashes: Sequence[BlockHash],
        parent_hash: BlockHash | None,
    ) -> None:
        """Register full, referenced blocks under their hashes.

        A hash already cached by another block keeps its first block; the duplicate stays
        uncached and returns to the plain free list when released.
        """
        if not self.enable_prefix_cache:
            return
        assert len(block_ids) == len(hashes)
        run: list[BlockHash] = []  # consecutive newly cached hashes, one event per run
        run_parent = parent_hash
        for i, (block_id, block_hash) in enumerate(zip(block_ids, hashes, strict=True)):
            assert self._ref_counts[block_id] > 0, "caching an unreferenced block"
            if self._hash_of[block_id] is None and block_hash not in self._cached:
                self._hash_of[block_id] = block_hash
                self._cached[block_hash] = block_id
                run.append(block_hash)
                continue
            if run:
                self._emit(BlockStored(self._take_event_id(), tuple(run), run_parent))
                run = []
            run_parent = hashes[i]
        if run:
            self._emit(BlockStored(self._take_event_id(), tuple(run), run_parent))

    def clear_cache(self) -> None:
        """Forget every cached hash. Blocks in use keep their contents; nothing is freed."""
        for block_id in list(self._free_cached):
            self._uncache(block_id)
            self._free_uncached.append(block_id)
        self._free_cached.clear()
        for block_hash in list(self._cached):
            self._uncache(self._cached[block_hash])
        self._emit(AllCleared(self._take_event_id()))

    def take_events(self) -> list[KvEvent]:
        events, self._events = self._events, []
        return events

    # -- internals -----------------------------------------------------------------------------

    def _uncache(self, block_id: BlockId) -> BlockHash:
        block_hash = self._hash_of[block_id]
        assert block_hash is not None
        self._hash_of[block_id] = None
        del self._cached[block_hash]
        return block_hash

    def _take_event_id(self) -> int:
        event_id = self._next_event_id
        self._next_event_id += 1
        return event_id

    def _emit(self, event: KvEvent) -> None:
        self._events.append(event)

    def _emit_removed(self, hashes: list[BlockHash]) -> None:
        self._emit(BlockRemoved(self._take_event_id(), tuple(hashes)))
