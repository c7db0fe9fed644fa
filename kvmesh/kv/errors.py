"""Errors of `kvmesh.kv`.

KvError (kvmesh.errors.KvmeshError)
├── InvalidTokenError      a token id cannot be hashed (negative or wider than 32 bits)
│                                                          INVALID_ARGUMENT
├── NoFreeBlocksError      the pool cannot supply the blocks asked for   RESOURCE_EXHAUSTED
├── LayoutMismatchError    two KV caches disagree on layout (shape, dtype, block size)
│                                                          FAILED_PRECONDITION
└── TransferError          a KV transfer between workers failed, timed out, or had no peer
"""

from __future__ import annotations

import grpc

from kvmesh.errors import KvmeshError


class KvError(KvmeshError):
    """Base of every error raised by kvmesh.kv."""


class NoFreeBlocksError(KvError):
    """Not enough free (or evictable) blocks."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class LayoutMismatchError(KvError):
    """Blocks cannot move between caches of different layouts."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class InvalidTokenError(KvError, ValueError):
    """A token id outside [0, 2**32)."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class TransferError(KvError):
    """Blocks could not be moved: NIXL missing, peer unknown or gone, transfer failed or late."""
