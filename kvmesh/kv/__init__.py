"""KV cache mechanisms shared by workers and the router: hashing, the block pool, events."""

from kvmesh.kv.block_pool import BlockId, BlockPool
from kvmesh.kv.cache import KvLayout, PagedKvCache
from kvmesh.kv.errors import InvalidTokenError, KvError, LayoutMismatchError, NoFreeBlocksError
from kvmesh.kv.events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    KvEventBatch,
    KvEventLog,
)
from kvmesh.kv.hashing import BlockHash, hash_block, hash_blocks, root_hash

__all__ = [
    "AllCleared",
    "BlockHash",
    "BlockId",
    "BlockPool",
    "BlockRemoved",
    "BlockStored",
    "InvalidTokenError",
    "KvError",
    "KvEvent",
    "KvEventBatch",
    "KvEventLog",
    "KvLayout",
    "LayoutMismatchError",
    "NoFreeBlocksError",
    "PagedKvCache",
    "hash_block",
    "hash_blocks",
    "root_hash",
]
