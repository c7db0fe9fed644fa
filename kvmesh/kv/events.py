"""KV events: what a worker's prefix cache gained or lost, for the router's global index.

Events carry monotonically increasing ids. A reader remembers the last id it saw and asks for
what came after; if the log has already dropped those events it is told so (a gap) and resyncs
from a snapshot of the cached hashes.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from kvmesh.kv.hashing import BlockHash


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks entered the prefix cache; `parent_hash` precedes the first of them."""

    event_id: int
    block_hashes: tuple[BlockHash, ...]
    parent_hash: BlockHash | None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks left the prefix cache (evicted)."""

    event_id: int
    block_hashes: tuple[BlockHash, ...]


@dataclass(frozen=True, slots=True)
class AllCleared:
    """The prefix cache was emptied."""

    event_id: int


KvEvent = BlockStored | BlockRemoved | AllCleared


@dataclass(frozen=True, slots=True)
class KvEventBatch:
    """What a reader gets: the events after its id, or `gap=True` when some were dropped."""

    events: tuple[KvEvent, ...]
    gap: bool
    last_event_id: int


class KvEventLog:
    """A bounded, thread-safe log of recent events (written by the engine, read by services)."""

    def __init__(self, capacity: int = 65536) -> None:
        self._events: deque[KvEvent] = deque(maxlen=capacity)
        self._last_event_id = 0
        self._lock = threading.Lock()

    @property
    def last_event_id(self) -> int:
        with self._lock:
            return self._last_event_id

    def extend(self, events: list[KvEvent]) -> None:
        with self._lock:
            for event in events:
                assert event.event_id > self._last_event_id, "event ids must increase"
                self._events.append(event)
                self._last_event_id = event.event_id

    def read_after(self, event_id: int) -> KvEventBatch:
        """Events with ids greater than `event_id`."""
        with self._lock:
            if event_id >= self._last_event_id:
                return KvEventBatch((), gap=False, last_event_id=self._last_event_id)
            oldest = self._events[0].event_id if self._events else self._last_event_id + 1
            if event_id + 1 < oldest:
                return KvEventBatch((), gap=True, last_event_id=self._last_event_id)
            newer = tuple(e for e in self._events if e.event_id > event_id)
            return KvEventBatch(newer, gap=False, last_event_id=self._last_event_id)
