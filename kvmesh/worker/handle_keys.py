"""A decode worker's view of the prefill workers' handle keys, from discovery.

Each prefill worker registers its Ed25519 public key (meta `handle_key`); a decode worker
checks every `KvHandle` it is given against the key of the worker the handle names
(`kvmesh.security.handles`). Keys are cached by worker id and fetched again when a worker is
unknown or a signature fails (a worker restarted under the same id has a new key), at most once
per `refresh_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from kvmesh.api.v1 import common_pb2
from kvmesh.discovery import Discovery
from kvmesh.errors import AuthorizationError
from kvmesh.kv.hashing import BlockHash
from kvmesh.security import handles

PREFILL_SERVICE = "kvmesh-prefill"


class HandleKeys:
    def __init__(self, discovery: Discovery, *, refresh_s: float = 1.0) -> None:
        self._discovery = discovery
        self._refresh_s = refresh_s
        self._keys: dict[str, str] = {}  # worker id -> public key (base64)
        self._refreshed = float("-inf")
        self._lock = asyncio.Lock()

    async def check(
        self, handle: common_pb2.KvHandle, prompt: Sequence[int], root: BlockHash
    ) -> bool:
        """True if the handle is genuine, unexpired and for `prompt`; False if its worker is
        unknown here (do not use it); AuthorizationError if it is forged, altered, expired or
        for another prompt."""
        key = self._keys.get(handle.worker_id)
        if key is None:
            await self._refresh()
            key = self._keys.get(handle.worker_id)
            if key is None:
                return False
        try:
            handles.verify(handle, key, prompt, root)
        except AuthorizationError:
            if not await self._refresh() or self._keys.get(handle.worker_id) in (None, key):
                raise
            handles.verify(handle, self._keys[handle.worker_id], prompt, root)
        return True

    async def close(self) -> None:
        await self._discovery.close()

    async def _refresh(self) -> bool:
        """Fetch the keys again unless that was done less than `refresh_s` ago."""
        async with self._lock:
            if time.monotonic() - self._refreshed < self._refresh_s:
                return False
            self._refreshed = time.monotonic()
            _, instances = await self._discovery.healthy(PREFILL_SERVICE)
            for instance in instances:
                worker_id, key = instance.meta.get("worker_id"), instance.meta.get(handles.META_KEY)
                if worker_id and key:
                    self._keys[worker_id] = key
            return True
