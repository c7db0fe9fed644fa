"""Lease-bound KV handles: what a prefill worker signs, and what a decode worker checks.

A prefill worker signs each `KvHandle` it issues with an Ed25519 key made when it starts; the
public key is in its discovery registration (meta `handle_key`). The signature covers every
field of the handle: the request id, the worker and its address, the block ids, the layout,
the lease's expiry, the chained hashes of the prompt's full blocks and a SHA-256 of all its
tokens. A decode worker, before it reserves or reads anything:

1. finds the issuing worker's key by its id (an unknown worker's handle is not used: the
   prompt is computed locally, so no foreign KV is ever read);
2. checks the signature (forged or altered: refused), the expiry (refused), and recomputes the
   prompt's block hashes and digest from the prompt it was given (another prompt: refused).

Refusals are PERMISSION_DENIED (`AuthorizationError`) and say which check failed.
"""

from __future__ import annotations

import base64
import hashlib
import time
from array import array
from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kvmesh.api.v1 import common_pb2
from kvmesh.errors import AuthorizationError
from kvmesh.kv.hashing import BlockHash, hash_blocks

META_KEY = "handle_key"


def prompt_digest(token_ids: Sequence[int]) -> bytes:
    return hashlib.sha256(array("I", token_ids).tobytes()).digest()


def _payload(handle: common_pb2.KvHandle) -> bytes:
    unsigned = common_pb2.KvHandle()
    unsigned.CopyFrom(handle)
    unsigned.ClearField("signature")
    return b"kvmesh-kv-handle/v1\n" + unsigned.SerializeToString(deterministic=True)


class HandleSigner:
    """A prefill worker's signing key."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()

    @property
    def public_key(self) -> str:
        """The public key, base64, as published in discovery."""
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    def bind(
        self,
        handle: common_pb2.KvHandle,
        prompt: Sequence[int],
        block_size: int,
        root: BlockHash,
    ) -> None:
        """Fill the handle's prompt binding and sign it (in place)."""
        handle.ClearField("block_hashes")
        handle.block_hashes.extend(hash_blocks(prompt, block_size, root))
        handle.prompt_digest = prompt_digest(prompt)
        handle.signature = self._key.sign(_payload(handle))


def verify(
    handle: common_pb2.KvHandle,
    public_key: str,
    prompt: Sequence[int],
    root: BlockHash,
    *,
    now: float | None = None,
) -> None:
    """Raise AuthorizationError unless `handle` is genuine, unexpired and for `prompt`."""
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key))
        key.verify(handle.signature, _payload(handle))
    except (InvalidSignature, ValueError):
        raise AuthorizationError(
            f"KV handle for {handle.request_id!r} is forged or altered: its signature does not "
            f"match prefill worker {handle.worker_id!r}'s key"
        ) from None
    now = time.time() if now is None else now
    if handle.lease_expiry.ToMicroseconds() / 1e6 <= now:
        raise AuthorizationError(f"KV handle for {handle.request_id!r} has expired")
    expected = hash_blocks(prompt, handle.block_size, root) if handle.block_size else []
    if prompt_digest(prompt) != handle.prompt_digest or list(handle.block_hashes) != expected:
        raise AuthorizationError(
            f"KV handle for {handle.request_id!r} was issued for another prompt"
        )
