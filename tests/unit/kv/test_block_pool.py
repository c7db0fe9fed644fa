import pytest

from kvmesh.kv.block_pool import BlockId, BlockPool
from kvmesh.kv.errors import NoFreeBlocksError
from kvmesh.kv.events import AllCleared, BlockRemoved, BlockStored
from kvmesh.kv.hashing import BlockHash

H = [BlockHash(1000 + i) for i in range(10)]


def test_allocate_and_release_make_the_pool_whole() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert len(set(blocks)) == 3
    assert pool.num_free_blocks == 1
    assert not pool.is_whole()
    pool.release(blocks)
    assert pool.is_whole()


def test_allocation_is_all_or_nothing() -> None:
    pool = BlockPool(2)
    pool.allocate(1)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1


def test_cached_blocks_survive_release_and_are_found() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.cache(blocks, H[:2], parent_hash=None)
    pool.release(blocks)
    assert pool.is_whole()
    assert pool.num_cached_blocks == 2
    assert pool.lookup([H[0], H[1], H[2]]) == blocks
    assert pool.lookup([H[1]]) == [blocks[1]]
    assert pool.lookup([H[5], H[0]]) == []


def test_uncached_blocks_are_used_before_evicting_cached_ones() -> None:
    pool = BlockPool(3)
    cached = pool.allocate(1)
    pool.cache(cached, H[:1], None)
    pool.release(cached)
    pool.take_events()
    fresh = pool.allocate(2)
    assert cached[0] not in fresh
    assert pool.num_cached_blocks == 1
    assert pool.take_events() == []


def test_eviction_is_lru_and_emits_removed_events() -> None:
    pool = BlockPool(3)
    first, second, third = (pool.allocate(1) for _ in range(3))
    for blocks, h in ((first, H[0]), (second, H[1]), (third, H[2])):
        pool.cache(blocks, [h], None)
    pool.release(second)  # freed first: least recently freed
    pool.release(first)
    pool.release(third)
    pool.take_events()
    evicted = pool.allocate(2)
    assert evicted == [second[0], first[0]]
    assert pool.lookup([H[2]]) == third
    events = pool.take_events()
    assert len(events) == 1
    assert isinstance(events[0], BlockRemoved)
    assert events[0].block_hashes == (H[1], H[0])


def test_release_frees_a_sequence_tail_first() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    pool.cache(blocks, H[:3], None)
    pool.release(blocks)
    assert pool.allocate(1) == [blocks[2]]  # the tail goes first; the shared prefix stays


def test_acquire_takes_a_cached_free_block_out_of_the_free_list() -> None:
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.cache(blocks, H[:1], None)
    pool.release(blocks)
    assert pool.num_free_blocks == 2
    pool.acquire(blocks)
    assert pool.num_free_blocks == 1
    assert pool.ref_count(blocks[0]) == 1
    pool.acquire(blocks)
    pool.release(blocks)
    pool.release(blocks)
    assert pool.is_whole()


def test_duplicate_content_keeps_the_first_block() -> None:
    pool = BlockPool(4)
    a = pool.allocate(1)
    b = pool.allocate(1)
    pool.cache(a, [H[0]], None)
    pool.cache(b, [H[0]], None)
    assert pool.lookup([H[0]]) == a
    pool.release(b)
    pool.release(a)
    assert pool.num_cached_blocks == 1
    assert pool.is_whole()


def test_stored_events_chain_and_have_increasing_ids() -> None:
    pool = BlockPool(8)
    blocks = pool.allocate(3)
    pool.cache(blocks[:1], H[:1], parent_hash=None)
    pool.cache(blocks[1:], H[1:3], parent_hash=H[0])
    events = pool.take_events()
    assert [type(e) for e in events] == [BlockStored, BlockStored]
    assert events[0].block_hashes == (H[0],)
    assert events[1] == BlockStored(events[1].event_id, (H[1], H[2]), H[0])
    assert events[0].event_id < events[1].event_id


def test_a_skipped_duplicate_splits_the_stored_event() -> None:
    pool = BlockPool(8)
    other = pool.allocate(1)
    pool.cache(other, [H[1]], None)
    pool.take_events()
    blocks = pool.allocate(3)
    pool.cache(blocks, H[:3], parent_hash=None)
    events = pool.take_events()
    assert [(e.block_hashes, e.parent_hash) for e in events if isinstance(e, BlockStored)] == [
        ((H[0],), None),
        ((H[2],), H[1]),
    ]


def test_clear_cache_forgets_hashes_and_emits_all_cleared() -> None:
    pool = BlockPool(4)
    held = pool.allocate(1)
    freed = pool.allocate(1)
    pool.cache(held, [H[0]], None)
    pool.cache(freed, [H[1]], None)
    pool.release(freed)
    pool.take_events()
    pool.clear_cache()
    assert pool.num_cached_blocks == 0
    assert pool.lookup([H[0]]) == []
    assert isinstance(pool.take_events()[-1], AllCleared)
    pool.release(held)
    assert pool.is_whole()


def test_disabled_prefix_cache_never_caches() -> None:
    pool = BlockPool(2, enable_prefix_cache=False)
    blocks = pool.allocate(1)
    pool.cache(blocks, [H[0]], None)
    assert pool.lookup([H[0]]) == []
    assert pool.take_events() == []


def test_releasing_too_often_is_a_bug() -> None:
    pool = BlockPool(1)
    blocks = pool.allocate(1)
    pool.release(blocks)
    with pytest.raises(AssertionError):
        pool.release([BlockId(blocks[0])])
