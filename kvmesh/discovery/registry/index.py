"""A datacenter's raft-like index, and the blocking queries that wait for it to move.

Every change to a datacenter's state takes the next index and wakes every waiter of that
datacenter; each waiter then asks its own query whether *its* index moved (a KV watch does not
return because a service registered). Consul does the same with its memdb watch sets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class IndexCounter:
    """A monotonically increasing index with a wake-up for blocking queries."""

    def __init__(self) -> None:
        self.value = 0
        self._changed = asyncio.Event()
        self._closed = False

    def bump(self) -> int:
        """Take the next index and wake every waiter."""
        self.value += 1
        self._wake()
        return self.value

    @property
    def changed(self) -> asyncio.Event:
        """Set at the next bump; take it before reading state to miss no change."""
        return self._changed

    def close(self) -> None:
        """Release every waiter now and make later waits return at once."""
        self._closed = True
        self._wake()

    async def wait_past(self, min_index: int, current: Callable[[], int], timeout_s: float) -> None:
        """Wait until `current()` differs from `min_index`, the timeout passes, or close().

        An index that is ahead of the query's current one (the registry restarted, or the
        client sent another query's index) also differs: the query answers at once with its
        own index and the client resets to it.
        """
        deadline = time.monotonic() + timeout_s
        while not self._closed and current() == min_index:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if not await wait_event(self._changed, remaining):
                return

    def _wake(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()


async def wait_event(event: asyncio.Event, timeout_s: float | None) -> bool:
    """Wait for `event` up to `timeout_s`; whether it was set.

    Not `asyncio.wait_for`: before Python 3.12 it swallows a cancellation that arrives just as
    the event is set, and a task stopped that way keeps running.
    """
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        waiter.cancel()
    return bool(done)
