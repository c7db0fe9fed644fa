"""Wake on request: while a request waits for a decode worker, the router says so in Consul KV.

A tier scaled to zero has no worker to report load, so the autoscaler cannot see the demand;
the waiting router writes `kvmesh.discovery.keys.wake_key(model, tier)` instead, and the
autoscaler scales that tier up at once. The value is JSON `{"time": <unix seconds>, "router":
<this router's address>}`, rewritten every `refresh_s` while any request waits, so a reader
tells a live wake from a stale one by its time. The key is left in place when a worker appears
(another router may still wait; the time ages it out).

Registry failures are logged and retried at the next refresh; they never fail a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Protocol

import structlog

from kvmesh.discovery import DiscoveryError
from kvmesh.discovery.keys import wake_key

log = structlog.get_logger(__name__)

REFRESH_S = 2.0


class KvWriter(Protocol):
    """The part of `kvmesh.discovery.Discovery` the wake signal uses."""

    async def kv_put(
        self,
        key: str,
        value: bytes | str,
        *,
        cas: int | None = None,
        datacenter: str | None = None,
    ) -> bool: ...


class WakeSignal:
    """One (model, tier)'s wake key, kept fresh while at least one request waits."""

    def __init__(
        self,
        kv: KvWriter,
        model_id: str,
        tier: str,
        *,
        datacenter: str | None = None,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self.key = wake_key(model_id, tier)
        self.router = ""  # this router's address, once it serves
        self._kv = kv
        self._datacenter = datacenter
        self._refresh_s = refresh_s
        self._waiting = 0
        self._writer: asyncio.Task[None] | None = None

    @property
    def is_raised(self) -> bool:
        """Whether a request waits now (and the key is being kept fresh)."""
        return self._writer is not None

    @contextlib.asynccontextmanager
    async def raised(self) -> AsyncIterator[None]:
        """While inside, the key is written and refreshed; one writer for every waiting request."""
        self._waiting += 1
        if self._writer is None:
            self._writer = asyncio.create_task(self._keep_fresh(), name=f"wake {self.key}")
        try:
            yield
        finally:
            self._waiting -= 1
            if self._waiting == 0 and self._writer is not None:
                self._writer.cancel()
                self._writer = None

    async def _keep_fresh(self) -> None:
        log.info("a request waits for a worker; writing the wake key", key=self.key)
        while True:
            value = json.dumps({"time": time.time(), "router": self.router})
            try:
                await self._kv.kv_put(self.key, value, datacenter=self._datacenter)
            except DiscoveryError as e:
                log.warning("writing the wake key failed; retrying", key=self.key, error=str(e))
            await asyncio.sleep(self._refresh_s)
