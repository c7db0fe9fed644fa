"""Errors of `kvmesh.kv`.

KvError
├── InvalidTokenError      a token id cannot be hashed (negative or wider than 32 bits)
├── NoFreeBlocksError      the pool cannot supply the blocks asked for
├── LayoutMismatchError    two KV caches disagree on layout (shape, dtype, block size)
└── TransferError          a KV transfer between workers failed, timed out, or had no peer
"""

from __future__ import annotations


class KvError(Exception):
    """Base of every error raised by kvmesh.kv."""


class NoFreeBlocksError(KvError):
    """Not enough free (or evictable) blocks."""


class LayoutMismatchError(KvError):
    """Blocks cannot move between caches of different layouts."""


class InvalidTokenError(KvError, ValueError):
    """A token id outside [0, 2**32)."""


class TransferError(KvError):
    """Blocks could not be moved: NIXL missing, peer unknown or gone, transfer failed or late."""
