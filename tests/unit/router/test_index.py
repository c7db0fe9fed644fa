"""The prefix index: exact entries from events, approximate ones from routing, bounded memory."""

from __future__ import annotations

from kvmesh.kv.hashing import BlockHash, hash_blocks, root_hash
from services.router.index import APPROXIMATE, EXACT, PrefixIndex

ROOT = root_hash("test-model")


def _hashes(tokens: list[int]) -> list[BlockHash]:
    return hash_blocks(tokens, 4, ROOT)


SHARED = list(range(100, 116))  # 4 blocks
A = _hashes([*SHARED, *range(200, 208)])  # 6 blocks, the first 4 shared with B
B = _hashes([*SHARED, *range(300, 308)])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_overlap_is_the_leading_run_of_blocks_each_worker_holds() -> None:
    index = PrefixIndex()
    index.reset("w1", A, last_event_id=0)
    index.reset("w2", A[:2], last_event_id=0)
    index.reset("w3", [], last_event_id=0)
    assert index.overlap(A, ["w1", "w2", "w3"]) == {"w1": 6, "w2": 2, "w3": 0}
    assert index.overlap(B, ["w1", "w2", "w3"]) == {"w1": 4, "w2": 2, "w3": 0}
    # A worker holding a later block but not an earlier one holds no prefix beyond the gap.
    index.reset("w4", A[1:], last_event_id=0)
    assert index.overlap(A, ["w4"]) == {"w4": 0}


def test_events_add_remove_and_clear_entries() -> None:
    index = PrefixIndex()
    index.reset("w1", [], last_event_id=0)
    index.stored("w1", 1, A)
    assert index.overlap(A, ["w1"]) == {"w1": 6}
    index.removed("w1", 2, A[3:])
    assert index.overlap(A, ["w1"]) == {"w1": 3}
    assert index.last_event_id("w1") == 2
    index.cleared("w1", 3)
    assert index.overlap(A, ["w1"]) == {"w1": 0}
    assert index.num_entries == 0
    assert index.num_blocks == 0


def test_a_worker_that_leaves_loses_every_entry() -> None:
    index = PrefixIndex()
    index.reset("w1", A, last_event_id=5)
    index.reset("w2", B, last_event_id=5)
    index.remove_worker("w1")
    assert index.overlap(A, ["w1", "w2"]) == {"w1": 0, "w2": 4}
    assert index.num_entries == len(B)
    assert index.num_blocks == len(B)
    assert index.workers() == ["w2"]


def test_approximate_workers_are_indexed_by_routing_until_the_ttl() -> None:
    clock = Clock()
    index = PrefixIndex(approx_ttl_s=10.0, clock=clock)
    index.reset("w1", A, last_event_id=0)
    assert index.make_approximate("w1", "stalled")
    assert not index.make_approximate("w1", "stalled again")  # already approximate
    assert index.mode("w1") == APPROXIMATE
    assert index.reason("w1") == "stalled again"
    assert index.overlap(A, ["w1"]) == {"w1": 0}  # exact entries are no longer trusted
    index.routed("w1", B)
    assert index.overlap(B, ["w1"]) == {"w1": 6}
    # Events for an approximate worker are ignored until a resync.
    index.stored("w1", 7, A)
    assert index.overlap(A, ["w1"]) == {"w1": 4}
    clock.now = 11.0
    assert index.overlap(B, ["w1"]) == {"w1": 0}  # expired, though not yet purged
    index.expire()
    assert index.num_entries == 0
    index.reset("w1", A, last_event_id=9)
    assert index.mode("w1") == EXACT
    assert index.overlap(A, ["w1"]) == {"w1": 6}


def test_a_prompt_just_sent_counts_as_held_until_its_events_are_due() -> None:
    clock = Clock()
    index = PrefixIndex(pending_ttl_s=5.0, clock=clock)
    index.reset("w1", [], last_event_id=0)
    index.reset("w2", [], last_event_id=0)
    index.routed("w1", A)  # prefill still running: no stored event yet
    assert index.overlap(B, ["w1", "w2"]) == {"w1": 4, "w2": 0}
    index.stored("w1", 1, A[:2])  # the events arrive (here, for part of it)
    clock.now = 6.0
    assert index.overlap(A, ["w1", "w2"]) == {"w1": 2, "w2": 0}  # only the events remain
    index.expire()
    assert index.num_entries == 2


def test_approximate_entries_are_capped_per_worker() -> None:
    index = PrefixIndex(approx_max_blocks=8)
    index.make_approximate("w1", "absent")
    for group in range(10):
        index.routed("w1", _hashes([group, *range(1000, 1015)]))  # 4 blocks each
    assert index.num_entries == 8
    assert index.num_blocks == 8
    newest = _hashes([9, *range(1000, 1015)])
    assert index.overlap(newest, ["w1"]) == {"w1": 4}
    oldest = _hashes([0, *range(1000, 1015)])
    assert index.overlap(oldest, ["w1"]) == {"w1": 0}


def test_unknown_workers_overlap_nothing() -> None:
    index = PrefixIndex()
    assert index.overlap(A, ["nobody"]) == {"nobody": 0}
    assert index.mode("nobody") == APPROXIMATE


def test_a_new_worker_inherits_nothing_from_a_removed_one() -> None:
    index = PrefixIndex()
    index.reset("w1", A, last_event_id=0)
    index.make_approximate("w2", "absent")
    index.routed("w2", B)
    index.remove_worker("w1")
    index.remove_worker("w2")
    index.reset("w3", [], last_event_id=0)  # takes a freed slot
    index.make_approximate("w4", "absent")
    assert index.overlap(A, ["w3", "w4"]) == {"w3": 0, "w4": 0}
    assert index.overlap(B, ["w3", "w4"]) == {"w3": 0, "w4": 0}
    assert index.num_blocks == 0
