"""The router's global prefix index: which worker holds which cached KV block.

Workers publish what their prefix caches gain and lose (`Worker.WatchKvEvents`); the index
applies those events per worker, so `overlap(hashes)` can say, for each worker, how many of a
prompt's leading blocks it already holds. Block hashes are chained (`kvmesh/kv/hashing.py`), so
a worker holding block i of a prompt holds its whole prefix up to i: the overlap is the length
of the leading run of blocks a worker holds.

A worker whose events cannot be trusted (its stream broke, stalled, or it publishes none) is
indexed **approximately**: its exact entries are dropped and the router records its own routing
decisions for it instead, each for `approx_ttl_s`, since a worker's cache most likely holds what
was just sent to it. Memory stays bounded: exact entries leave when workers evict (the events
say so) or leave discovery; approximate entries expire and are capped per worker.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kvmesh.kv.hashing import BlockHash

EXACT = "exact"
APPROXIMATE = "approximate"


@dataclass(slots=True)
class _WorkerEntries:
    mode: str = EXACT
    reason: str = ""
    last_event_id: int = 0
    exact: set[BlockHash] = field(default_factory=set)
    # hash -> expiry (monotonic seconds), oldest first: expired entries leave from the front.
    approx: OrderedDict[BlockHash, float] = field(default_factory=OrderedDict)


class PrefixIndex:
    """Block hash -> workers holding it, kept from KV events (exact) or routing (approximate)."""

    def __init__(
        self,
        *,
        approx_ttl_s: float = 120.0,
        approx_max_blocks: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._approx_ttl_s = approx_ttl_s
        self._approx_max_blocks = approx_max_blocks
        self._clock = clock
        self._workers: dict[str, _WorkerEntries] = {}
        self._holders: dict[BlockHash, set[str]] = {}  # exact and approximate alike

    # -- what routing asks ---------------------------------------------------------------------

    def overlap(self, hashes: Sequence[BlockHash], workers: Iterable[str]) -> dict[str, int]:
        """For each of `workers`, how many leading blocks of `hashes` it holds (0 if none)."""
        counts = dict.fromkeys(workers, 0)
        alive = set(counts)
        now = self._clock()
        for i, block in enumerate(hashes):
            holders = self._holders.get(block)
            if not holders:
                break
            alive &= holders
            for worker_id in list(alive):
                entries = self._workers[worker_id]
                if entries.mode == APPROXIMATE and entries.approx.get(block, now) < now:
                    alive.discard(worker_id)  # expired, not yet purged
            if not alive:
                break
            for worker_id in alive:
                counts[worker_id] = i + 1
        return counts

    def mode(self, worker_id: str) -> str:
        entries = self._workers.get(worker_id)
        return entries.mode if entries else APPROXIMATE

    def reason(self, worker_id: str) -> str:
        entries = self._workers.get(worker_id)
        return entries.reason if entries else "not indexed"

    def last_event_id(self, worker_id: str) -> int:
        entries = self._workers.get(worker_id)
        return entries.last_event_id if entries else 0

    @property
    def num_entries(self) -> int:
        """(worker, block) pairs held, exact and approximate: the index's size."""
        return sum(len(e.exact) + len(e.approx) for e in self._workers.values())

    @property
    def num_blocks(self) -> int:
        """Distinct block hashes indexed."""
        return len(self._holders)

    def workers(self) -> list[str]:
        return list(self._workers)

    # -- exact: events -------------------------------------------------------------------------

    def reset(self, worker_id: str, hashes: Iterable[BlockHash], last_event_id: int) -> None:
        """Replace a worker's entries with a snapshot of its cache; it is exact again."""
        self.remove_worker(worker_id)
        entries = self._workers[worker_id] = _WorkerEntries(last_event_id=last_event_id)
        self._store(worker_id, entries, hashes)

    def stored(self, worker_id: str, event_id: int, hashes: Iterable[BlockHash]) -> None:
        entries = self._exact_entries(worker_id, event_id)
        if entries is not None:
            self._store(worker_id, entries, hashes)

    def removed(self, worker_id: str, event_id: int, hashes: Iterable[BlockHash]) -> None:
        entries = self._exact_entries(worker_id, event_id)
        if entries is None:
            return
        for block in hashes:
            if block in entries.exact:
                entries.exact.discard(block)
                self._drop_holder(block, worker_id)

    def cleared(self, worker_id: str, event_id: int) -> None:
        entries = self._exact_entries(worker_id, event_id)
        if entries is None:
            return
        for block in entries.exact:
            self._drop_holder(block, worker_id)
        entries.exact.clear()

    def _exact_entries(self, worker_id: str, event_id: int) -> _WorkerEntries | None:
        entries = self._workers.get(worker_id)
        if entries is None or entries.mode != EXACT:
            return None
        entries.last_event_id = max(entries.last_event_id, event_id)
        return entries

    def _store(self, worker_id: str, entries: _WorkerEntries, hashes: Iterable[BlockHash]) -> None:
        for block in hashes:
            if block not in entries.exact:
                entries.exact.add(block)
                self._holders.setdefault(block, set()).add(worker_id)

    # -- approximate: routing decisions ----------------------------------------------------------

    def make_approximate(self, worker_id: str, reason: str) -> bool:
        """Stop trusting a worker's events; True if it was exact (or unknown) until now."""
        entries = self._workers.get(worker_id)
        if entries is not None and entries.mode == APPROXIMATE:
            entries.reason = reason
            return False
        self.remove_worker(worker_id)
        self._workers[worker_id] = _WorkerEntries(mode=APPROXIMATE, reason=reason)
        return True

    def routed(self, worker_id: str, hashes: Sequence[BlockHash]) -> None:
        """A request with these blocks was sent to the worker: remember it if approximate."""
        entries = self._workers.get(worker_id)
        if entries is None or entries.mode != APPROXIMATE:
            return
        now = self._clock()
        self._expire(worker_id, entries, now)
        expiry = now + self._approx_ttl_s
        for block in hashes:
            if block in entries.approx:
                entries.approx.move_to_end(block)
            else:
                self._holders.setdefault(block, set()).add(worker_id)
            entries.approx[block] = expiry
        while len(entries.approx) > self._approx_max_blocks:
            oldest, _ = entries.approx.popitem(last=False)
            self._drop_holder(oldest, worker_id)

    def expire(self) -> None:
        """Drop approximate entries past their TTL (also done lazily as workers are routed to)."""
        now = self._clock()
        for worker_id, entries in self._workers.items():
            self._expire(worker_id, entries, now)

    def _expire(self, worker_id: str, entries: _WorkerEntries, now: float) -> None:
        approx = entries.approx
        while approx:
            block, expiry = next(iter(approx.items()))
            if expiry >= now:
                return
            approx.popitem(last=False)
            self._drop_holder(block, worker_id)

    # -- membership ------------------------------------------------------------------------------

    def remove_worker(self, worker_id: str) -> None:
        """Forget everything about a worker (it left discovery, or is about to be resynced)."""
        entries = self._workers.pop(worker_id, None)
        if entries is None:
            return
        for block in (*entries.exact, *entries.approx):
            self._drop_holder(block, worker_id)

    def _drop_holder(self, block: BlockHash, worker_id: str) -> None:
        holders = self._holders.get(block)
        if holders is None:
            return
        holders.discard(worker_id)
        if not holders:
            del self._holders[block]
