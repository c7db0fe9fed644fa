"""Leases on exported KV: a prefill worker's pinned blocks live until released or expired.

The decode side releases a lease by the NIXL notification that completes its READ (or, when it
read nothing, by `KvTransfer.ReleaseLease`). A decode worker that dies, a request cancelled
between prefill and decode, a router that crashed: their leases expire, so no block leaks.

Each lease has a release token, a random capability carried in the signed `KvHandle`: a release
counts only with it, so only the handle's holder (the router, the decode worker it chose) can
release a lease; request ids, which clients choose, are not enough.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from kvmesh.errors import AuthorizationError, UnknownRequestError
from kvmesh.telemetry import metrics

log = structlog.get_logger(__name__)

RELEASE_PREFIX = b"kvmesh-release:"


def new_release_token() -> bytes:
    return secrets.token_bytes(16)


def release_message(request_id: str, token: bytes) -> bytes:
    """The NIXL notification that tells a prefill worker to release `request_id`'s lease."""
    return RELEASE_PREFIX + token.hex().encode() + b":" + request_id.encode()


def _parse_release(message: bytes) -> tuple[str, bytes] | None:
    token_hex, sep, request_id = message[len(RELEASE_PREFIX) :].partition(b":")
    try:
        return (request_id.decode(), bytes.fromhex(token_hex.decode())) if sep else None
    except ValueError:
        return None


@dataclass(slots=True)
class LeaseStats:
    granted: int = 0
    released: int = 0
    expired: int = 0
    refused: int = 0  # releases without the lease's token


class LeaseTable:
    def __init__(
        self,
        release_export: Callable[[str], Awaitable[None]],
        *,
        take_notifications: Callable[[], list[tuple[str, bytes]]] | None = None,
        poll_interval_s: float = 0.002,
    ) -> None:
        self._release_export = release_export
        self._take_notifications = take_notifications
        self._poll_interval_s = poll_interval_s
        self._expiry: dict[str, float] = {}
        self._tokens: dict[str, bytes] = {}
        self._heap: list[tuple[float, str]] = []
        self._granted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.stats = LeaseStats()
        metrics.zero(metrics.WORKER_LEASES, "released", "expired", "refused")

    @property
    def active(self) -> int:
        return len(self._expiry)

    def grant(self, request_id: str, ttl_s: float, token: bytes) -> None:
        expiry = time.monotonic() + ttl_s
        self._expiry[request_id] = expiry
        self._tokens[request_id] = token
        heapq.heappush(self._heap, (expiry, request_id))
        self.stats.granted += 1
        metrics.WORKER_LEASES_ACTIVE.set(len(self._expiry))
        self._granted.set()

    async def release(self, request_id: str, token: bytes) -> bool:
        """Release a lease now; False if it is unknown (released or expired already).
        AuthorizationError if it is held and `token` is not its token."""
        held = self._tokens.get(request_id)
        if held is None:
            return False
        if not hmac.compare_digest(held, token):
            self.stats.refused += 1
            metrics.WORKER_LEASES.labels("refused").inc()
            raise AuthorizationError(
                f"the lease of {request_id!r} is held by another peer: releasing it needs the "
                "release token of its KV handle"
            )
        self.stats.released += 1
        metrics.WORKER_LEASES.labels("released").inc()
        await self._drop(request_id)
        return True

    async def _drop(self, request_id: str) -> None:
        del self._expiry[request_id], self._tokens[request_id]
        await self._unpin(request_id)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kvmesh-leases")

    async def stop(self) -> None:
        """Stop watching; release every lease still held."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for request_id in list(self._expiry):
            await self._drop(request_id)

    async def _run(self) -> None:
        while True:
            if not self._expiry:
                self._granted.clear()
                await self._granted.wait()
            await self._release_notified()
            await self._expire(time.monotonic())
            await asyncio.sleep(self._poll_interval_s)  # NIXL notifications are polled

    async def _release_notified(self) -> None:
        if self._take_notifications is None:
            return
        for peer, message in self._take_notifications():
            parsed = _parse_release(message) if message.startswith(RELEASE_PREFIX) else None
            if parsed is None:
                continue
            try:
                await self.release(*parsed)
            except AuthorizationError as e:
                log.warning("lease release refused", peer=peer, error=str(e))

    async def _expire(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expiry, request_id = heapq.heappop(self._heap)
            if self._expiry.get(request_id) != expiry:
                continue  # released, or granted again with a later expiry
            del self._expiry[request_id], self._tokens[request_id]
            self.stats.expired += 1
            metrics.WORKER_LEASES.labels("expired").inc()
            log.info("lease expired", request_id=request_id)
            await self._unpin(request_id)

    async def _unpin(self, request_id: str) -> None:
        metrics.WORKER_LEASES_ACTIVE.set(len(self._expiry))
        with contextlib.suppress(UnknownRequestError):  # already aborted with its request
            await self._release_export(request_id)
