"""KV cache mechanisms shared by workers and the router: hashing, the block pool, events,
and the NIXL transfer agent (NIXL itself is imported on first use).
"""

from kvmesh.kv.block_pool import BlockId, BlockPool
from kvmesh.kv.cache import KvLayout, PagedKvCache
from kvmesh.kv.errors import (
    InvalidTokenError,
    KvError,
    LayoutMismatchError,
    NoFreeBlocksError,
    TransferError,
)
from kvmesh.kv.events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    KvEventBatch,
    KvEventLog,
)
from kvmesh.kv.hashing import BlockHash, hash_block, hash_blocks, root_hash
from kvmesh.kv.transfer import KvRegion, KvTransferAgent, TransferResult, TransferStats

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
    "KvRegion",
    "KvTransferAgent",
    "LayoutMismatchError",
    "NoFreeBlocksError",
    "PagedKvCache",
    "TransferError",
    "TransferResult",
    "TransferStats",
    "hash_block",
    "hash_blocks",
    "root_hash",
]
