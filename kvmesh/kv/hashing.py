"""Chained 64-bit block hashes: the one definition shared by router and workers.

A block's hash covers its own token ids and, through the parent hash, every token before it, so
equal hashes mean equal prefixes. Only full blocks are hashed.

    root    = xxh3_64(b"kvmesh/v1" 0x00 model_id 0x00 adapter [0x00 "salt:" salt]
                      [0x00 "kv:" kv_dtype], seed=HASH_SEED)
    hash[i] = xxh3_64(u64le(parent) || u32le(token) for each token of block i, seed=HASH_SEED)
    parent  = root for block 0, hash[i-1] otherwise

Changing any of this changes every hash in a deployment: the golden vectors in
tests/unit/kv/test_hashing.py pin it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NewType

import numpy as np
import xxhash

from kvmesh.kv.errors import InvalidTokenError

BlockHash = NewType("BlockHash", int)

HASH_SEED = 0x6B766D657368  # "kvmesh"
_ROOT_DOMAIN = b"kvmesh/v1"
_MAX_TOKEN_ID = 2**32 - 1


def root_hash(model_id: str, adapter: str = "", salt: str = "", kv_dtype: str = "") -> BlockHash:
    """The parent of a sequence's first block: folds the model (and adapter, a cache salt, and
    the KV dtype) into every hash. Different salts share no block: tenants do not see each
    other's cache; different KV dtypes share none either: FP8 blocks are never a hit for a
    bf16 prefix. Workers and routers pass the worker's KV dtype (`EngineInfo.kv_dtype`, the
    discovery meta `kv_dtype`); KV handles bind their prompt without it."""
    parts = [_ROOT_DOMAIN, model_id.encode(), adapter.encode()]
    if salt:
        parts.append(b"salt:" + salt.encode())
    if kv_dtype:
        parts.append(b"kv:" + kv_dtype.encode())
    return BlockHash(xxhash.xxh3_64_intdigest(b"\x00".join(parts), seed=HASH_SEED))


def tenant_salt(tenant: str, cache_salt: str) -> str:
    """The salt a request's blocks are hashed with: its tenant's and its own, together."""
    return f"{tenant}\x00{cache_salt}" if tenant or cache_salt else ""


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    tokens = np.asarray(token_ids, dtype=np.int64)
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > _MAX_TOKEN_ID):
        raise InvalidTokenError(f"token ids must be in [0, {_MAX_TOKEN_ID}]")
    return tokens.astype("<u4").tobytes()


def _chain(parent: BlockHash, block_bytes: bytes) -> BlockHash:
    material = struct.pack("<Q", parent) + block_bytes
    return BlockHash(xxhash.xxh3_64_intdigest(material, seed=HASH_SEED))


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """The hash of one block given its parent's hash."""
    return _chain(parent, _token_bytes(token_ids))


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    parent: BlockHash,
    *,
    start_block: int = 0,
) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids`, from block `start_block` on.

    `parent` is the root hash when `start_block` is 0, otherwise the hash of block
    `start_block - 1`: callers extend a sequence's hashes without rehashing its prefix.
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    num_full = len(token_ids) // block_size
    if num_full <= start_block:
        return []
    data = _token_bytes(token_ids[start_block * block_size : num_full * block_size])
    stride = 4 * block_size
    hashes: list[BlockHash] = []
    for offset in range(0, len(data), stride):
        parent = _chain(parent, data[offset : offset + stride])
        hashes.append(parent)
    return hashes
