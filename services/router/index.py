"""The router's global prefix index: which worker holds which cached KV block.

Workers publish what their prefix caches gain and lose (`Worker.WatchKvEvents`); the index
applies those events per worker, so `overlap(hashes)` can say, for each worker, how many of a
prompt's leading blocks it already holds. Block hashes are chained (`kvmesh/kv/hashing.py`), so
a worker holding block i of a prompt holds its whole prefix up to i: the overlap is the length
of the leading run of blocks a worker holds.

The router also remembers where it just sent each prompt (`routed`): a worker most likely
holds what was just sent to it, and its events say so only once the prefill is done — without
this, requests of one prefix arriving close together would scatter. Those entries last
`pending_ttl_s`. A worker whose events cannot be trusted (its stream broke, stalled, or it
publishes none) is indexed **approximately**: its exact entries are dropped and only the routing
entries remain, each for `approx_ttl_s`. Memory stays bounded: exact entries leave when workers
evict (the events say so) or leave discovery; routing entries expire and are capped per worker.
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
    bit: int  # this worker's bit in the holder masks
    mode: str = EXACT
    reason: str = ""
    last_event_id: int = 0
    exact_blocks: int = 0
    # Routing entries: hash -> expiry (monotonic seconds), oldest first, expired leave first.
    routed: OrderedDict[BlockHash, float] = field(default_factory=OrderedDict)


class PrefixIndex:
    """Block hash -> workers holding it, kept from KV events (exact) or routing (approximate).

    Memory: one dict entry per distinct block, its holders a bit mask of worker slots; routing
    entries likewise in a second, smaller dict. Removing a worker or clearing its cache scans
    the index once; both are rare next to lookups and events.
    """

    def __init__(
        self,
        *,
        approx_ttl_s: float = 120.0,
        pending_ttl_s: float = 10.0,
        approx_max_blocks: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._approx_ttl_s = approx_ttl_s
        self._pending_ttl_s = pending_ttl_s
        self._approx_max_blocks = approx_max_blocks
        self._clock = clock
        self._workers: dict[str, _WorkerEntries] = {}
        self._by_bit: dict[int, str] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._holders: dict[BlockHash, int] = {}  # block -> mask of workers holding it (events)
        self._routed: dict[BlockHash, int] = {}  # block -> mask of workers it was just sent to

    # -- what routing asks ---------------------------------------------------------------------

    def overlap(self, hashes: Sequence[BlockHash], workers: Iterable[str]) -> dict[str, int]:
        """For each of `workers`, how many leading blocks of `hashes` it holds (0 if none)."""
        counts = dict.fromkeys(workers, 0)
        alive = 0
        for worker_id in counts:
            entries = self._workers.get(worker_id)
            if entries is not None:
                alive |= entries.bit
        now = self._clock()
        holders, routed = self._holders, self._routed
        for i, block in enumerate(hashes):
            held = holders.get(block, 0) & alive
            recent = routed.get(block, 0) & alive & ~held
            while recent:  # routing entries count until they expire
                bit = recent & -recent
                recent ^= bit
                if self._workers[self._by_bit[bit]].routed.get(block, 0.0) >= now:
                    held |= bit
            self._record(counts, alive & ~held, i)
            alive = held
            if not alive:
                return counts
        self._record(counts, alive, len(hashes))
        return counts

    def _record(self, counts: dict[str, int], bits: int, count: int) -> None:
        while bits:
            bit = bits & -bits
            bits ^= bit
            counts[self._by_bit[bit]] = count

    def mode(self, worker_id: str) -> str:
        entries = self._workers.get(worker_id)
        return entries.mode if entries else APPROXIMATE

    def reason(self, worker_id: str) -> str:
        entries = self._workers.get(worker_id)
        return entries.reason if entries else "not indexed"

    def last_event_id(self, worker_id: str) -> int:
        entries = self._workers.get(worker_id)
        return entries.last_event_id if entries else 0

    def footprint(self, worker_id: str) -> int:
        """Blocks indexed for one worker: how much cached (or just sent) context it holds."""
        entries = self._workers.get(worker_id)
        return entries.exact_blocks + len(entries.routed) if entries else 0

    @property
    def num_entries(self) -> int:
        """(worker, block) pairs held, from events and from routing: the index's size."""
        return sum(e.exact_blocks + len(e.routed) for e in self._workers.values())

    @property
    def num_blocks(self) -> int:
        """Distinct block hashes indexed."""
        return len(self._holders.keys() | self._routed.keys())

    def workers(self) -> list[str]:
        return list(self._workers)

    # -- exact: events -------------------------------------------------------------------------

    def reset(self, worker_id: str, hashes: Iterable[BlockHash], last_event_id: int) -> None:
        """Replace a worker's entries with a snapshot of its cache; it is exact again."""
        self.remove_worker(worker_id)
        entries = self._add_worker(worker_id, EXACT, "")
        entries.last_event_id = last_event_id
        self._store(entries, hashes)

    def stored(self, worker_id: str, event_id: int, hashes: Iterable[BlockHash]) -> None:
        entries = self._exact_entries(worker_id, event_id)
        if entries is not None:
            self._store(entries, hashes)

    def removed(self, worker_id: str, event_id: int, hashes: Iterable[BlockHash]) -> None:
        entries = self._exact_entries(worker_id, event_id)
        if entries is None:
            return
        for block in hashes:
            if self._holders.get(block, 0) & entries.bit:
                self._drop_holder(block, entries.bit)
                entries.exact_blocks -= 1

    def cleared(self, worker_id: str, event_id: int) -> None:
        entries = self._exact_entries(worker_id, event_id)
        if entries is not None:
            self._drop_all(entries)

    def _exact_entries(self, worker_id: str, event_id: int) -> _WorkerEntries | None:
        entries = self._workers.get(worker_id)
        if entries is None or entries.mode != EXACT:
            return None
        entries.last_event_id = max(entries.last_event_id, event_id)
        return entries

    def _store(self, entries: _WorkerEntries, hashes: Iterable[BlockHash]) -> None:
        holders, bit = self._holders, entries.bit
        for block in hashes:
            mask = holders.get(block, 0)
            if not mask & bit:
                holders[block] = mask | bit
                entries.exact_blocks += 1

    # -- routing decisions; approximate workers ----------------------------------------------------

    def make_approximate(self, worker_id: str, reason: str) -> bool:
        """Stop trusting a worker's events; True if it was exact (or unknown) until now."""
        entries = self._workers.get(worker_id)
        if entries is not None and entries.mode == APPROXIMATE:
            entries.reason = reason
            return False
        self.remove_worker(worker_id)
        self._add_worker(worker_id, APPROXIMATE, reason)
        return True

    def routed(self, worker_id: str, hashes: Sequence[BlockHash]) -> None:
        """A request with these blocks was sent to the worker: it will hold them shortly."""
        entries = self._workers.get(worker_id)
        if entries is None:
            return
        now = self._clock()
        self._expire(entries, now)
        ttl = self._approx_ttl_s if entries.mode == APPROXIMATE else self._pending_ttl_s
        expiry = now + ttl
        routed, masks, bit = entries.routed, self._routed, entries.bit
        for block in hashes:
            if block in routed:
                routed.move_to_end(block)
            else:
                masks[block] = masks.get(block, 0) | bit
            routed[block] = expiry
        while len(routed) > self._approx_max_blocks:
            oldest, _ = routed.popitem(last=False)
            _clear_bit(masks, oldest, bit)

    def expire(self) -> None:
        """Drop routing entries past their TTL (also done lazily as workers are routed to)."""
        now = self._clock()
        for entries in self._workers.values():
            self._expire(entries, now)

    def _expire(self, entries: _WorkerEntries, now: float) -> None:
        routed = entries.routed
        while routed:
            block, expiry = next(iter(routed.items()))
            if expiry >= now:
                return
            routed.popitem(last=False)
            _clear_bit(self._routed, block, entries.bit)

    # -- membership ------------------------------------------------------------------------------

    def remove_worker(self, worker_id: str) -> None:
        """Forget everything about a worker (it left discovery, or is about to be resynced)."""
        entries = self._workers.pop(worker_id, None)
        if entries is None:
            return
        self._drop_all(entries)
        del self._by_bit[entries.bit]
        self._free_slots.append(entries.bit.bit_length() - 1)

    def _add_worker(self, worker_id: str, mode: str, reason: str) -> _WorkerEntries:
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot, self._next_slot = self._next_slot, self._next_slot + 1
        entries = _WorkerEntries(bit=1 << slot, mode=mode, reason=reason)
        self._workers[worker_id] = entries
        self._by_bit[entries.bit] = worker_id
        return entries

    def _drop_all(self, entries: _WorkerEntries) -> None:
        bit = entries.bit
        if entries.exact_blocks:
            holders = self._holders
            for block in [b for b, mask in holders.items() if mask & bit]:
                self._drop_holder(block, bit)
            entries.exact_blocks = 0
        for block in entries.routed:
            _clear_bit(self._routed, block, bit)
        entries.routed.clear()

    def _drop_holder(self, block: BlockHash, bit: int) -> None:
        _clear_bit(self._holders, block, bit)


def _clear_bit(masks: dict[BlockHash, int], block: BlockHash, bit: int) -> None:
    mask = masks.get(block, 0) & ~bit
    if mask:
        masks[block] = mask
    else:
        masks.pop(block, None)
