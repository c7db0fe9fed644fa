"""Two NIXL agents in one process, over UCX loopback: blocks, notifications, errors, counters."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator

import pytest
import torch

from kvmesh.kv.cache import KvLayout, PagedKvCache
from kvmesh.kv.errors import LayoutMismatchError, TransferError
from kvmesh.kv.transfer.agent import KvTransferAgent

LAYOUT = KvLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
NUM_BLOCKS = 16


def _agent(role: str, *, seed: int | None = None, progress_thread: bool = False) -> KvTransferAgent:
    cache = PagedKvCache(LAYOUT, NUM_BLOCKS, torch.device("cpu"))
    if seed is not None:
        cache.tensor.copy_(
            torch.randn(cache.tensor.shape, generator=torch.Generator().manual_seed(seed))
        )
    return KvTransferAgent(f"{role}-{uuid.uuid4().hex[:8]}", cache, progress_thread=progress_thread)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[KvTransferAgent, KvTransferAgent]]:
    """(reader, source), both served; the source's blocks hold random values, the reader's zeros.

    Without a progress thread a READ completes only while the owner is progressed: `serve()`
    runs as a task on this same loop while the reader awaits.
    """
    reader, source = _agent("decode"), _agent("prefill", seed=7)
    reader.add_peer(source.region())
    source.add_peer(reader.region())
    serving = [asyncio.create_task(agent.serve()) for agent in (reader, source)]
    yield reader, source
    reader.close()
    source.close()
    await asyncio.wait_for(asyncio.gather(*serving), timeout=5)  # serve() ends on close()


def _bytes(cache: PagedKvCache, block_ids: list[int]) -> bytes:
    return cache.tensor[block_ids].contiguous().view(torch.uint8).numpy().tobytes()


async def test_read_copies_scattered_blocks_byte_for_byte(
    pair: tuple[KvTransferAgent, KvTransferAgent],
) -> None:
    reader, source = pair
    remote, local = [3, 9, 0, 15], [7, 1, 12, 4]

    result = await reader.read_blocks(source.name, remote, local)

    assert _bytes(reader.kv_cache, local) == _bytes(source.kv_cache, remote)
    untouched = [b for b in range(NUM_BLOCKS) if b not in local]
    assert not reader.kv_cache.tensor[untouched].any()
    assert (result.num_blocks, result.num_bytes) == (4, 4 * LAYOUT.bytes_per_block)
    assert result.seconds > 0


async def test_reads_work_in_both_directions(
    pair: tuple[KvTransferAgent, KvTransferAgent],
) -> None:
    reader, source = pair
    await reader.read_blocks(source.name, [5], [2])
    await source.read_blocks(reader.name, [2], [11])
    assert _bytes(source.kv_cache, [11]) == _bytes(source.kv_cache, [5])


async def test_notification_reaches_the_source_after_the_read(
    pair: tuple[KvTransferAgent, KvTransferAgent],
) -> None:
    reader, source = pair
    await reader.read_blocks(source.name, [1, 2], [3, 4], notify=b"release:req-1")

    assert await source.wait_notifications(timeout_s=10) == [(reader.name, b"release:req-1")]
    assert source.take_notifications() == []


async def test_empty_read_returns_at_once_and_still_delivers_its_notification(
    pair: tuple[KvTransferAgent, KvTransferAgent],
) -> None:
    reader, source = pair
    assert (await reader.read_blocks("nobody", [], [])).num_blocks == 0

    result = await reader.read_blocks(source.name, [], [], notify=b"release:cached")

    assert (result.num_blocks, result.num_bytes) == (0, 0)
    assert await source.wait_notifications(timeout_s=10) == [(reader.name, b"release:cached")]
    assert reader.stats.transfers == 0


async def test_stats_count_completed_reads(
    pair: tuple[KvTransferAgent, KvTransferAgent],
) -> None:
    reader, source = pair
    await reader.read_blocks(source.name, [0, 1, 2], [0, 1, 2])
    await reader.read_blocks(source.name, [8], [9])

    stats = reader.stats
    assert (stats.transfers, stats.blocks_read) == (2, 4)
    assert stats.bytes_read == 4 * LAYOUT.bytes_per_block
    assert stats.seconds > 0 and stats.failures == 0
    assert source.stats.bytes_read == 0


def test_add_peer_is_idempotent(pair: tuple[KvTransferAgent, KvTransferAgent]) -> None:
    reader, source = pair
    assert reader.add_peer(source.region()) == source.name
    assert reader.peers == (source.name,)


@pytest.mark.parametrize(
    "change",
    [
        {"layout_fingerprint": "kvmesh-kv/v1:LT2HD:L2:H2:D8:B4:bf16"},
        {"block_size": 8},
        {"bytes_per_block": LAYOUT.bytes_per_block * 2},
    ],
)
def test_add_peer_refuses_another_layout(change: dict[str, object]) -> None:
    with _agent("decode") as reader, _agent("prefill") as source:
        region = dataclasses.replace(source.region(), **change)
        with pytest.raises(LayoutMismatchError):
            reader.add_peer(region)
        assert reader.peers == ()


def test_add_peer_refuses_a_real_cache_of_another_model_shape() -> None:
    other = KvLayout(2, 4, 8, 4, torch.float32)  # KV heads differ: nothing to convert
    with (
        _agent("decode") as reader,
        KvTransferAgent(
            f"bf16-{uuid.uuid4().hex[:8]}", PagedKvCache(other, 4, torch.device("cpu"))
        ) as source,
        pytest.raises(LayoutMismatchError),
    ):
        reader.add_peer(source.region())


def test_add_peer_refuses_blocks_outside_the_peers_registered_memory() -> None:
    with _agent("decode") as reader, _agent("prefill") as source:
        region = dataclasses.replace(source.region(), num_blocks=NUM_BLOCKS * 2)
        with pytest.raises(TransferError):
            reader.add_peer(region)
        assert reader.peers == ()


async def test_reading_from_an_unknown_peer_raises(
    pair: tuple[KvTransferAgent, KvTransferAgent],
) -> None:
    reader, source = pair
    with pytest.raises(TransferError, match="unknown peer"):
        await reader.read_blocks("nobody", [0], [0])
    reader.remove_peer(source.name)
    reader.remove_peer(source.name)
    with pytest.raises(TransferError, match="unknown peer"):
        await reader.read_blocks(source.name, [0], [0])


async def test_invalid_block_ids_are_refused_before_any_transfer(
    pair: tuple[KvTransferAgent, KvTransferAgent],
) -> None:
    reader, source = pair
    for remote, local in [([0, 1], [0]), ([NUM_BLOCKS], [0]), ([0], [-1]), ([0, 1], [2, 2])]:
        with pytest.raises(ValueError, match="block"):
            await reader.read_blocks(source.name, remote, local)
    assert reader.stats.transfers == 0


async def test_close_is_idempotent_and_final() -> None:
    agent = _agent("decode")
    agent.close()
    agent.close()
    with pytest.raises(TransferError, match="closed"):
        agent.region()
    with pytest.raises(TransferError, match="closed"):
        await agent.read_blocks("anyone", [0], [0])


async def test_with_progress_threads_reads_need_no_serve() -> None:
    with (
        _agent("decode", progress_thread=True) as reader,
        _agent("prefill", seed=3, progress_thread=True) as source,
    ):
        reader.add_peer(source.region())
        await reader.read_blocks(source.name, [6, 2], [0, 5], notify=b"threaded", timeout_s=10)

        assert _bytes(reader.kv_cache, [0, 5]) == _bytes(source.kv_cache, [6, 2])
        assert await source.wait_notifications(timeout_s=10) == [(reader.name, b"threaded")]


def _source(layout: KvLayout, num_blocks: int, tokens: torch.Tensor) -> KvTransferAgent:
    """An agent whose cache holds `tokens` `[T, L, 2, H, D]` in order from block 0, in
    `layout` (quantized for FP8)."""
    from kvmesh.kv.convert import write_converted

    cache = PagedKvCache(layout, num_blocks, torch.device("cpu"))
    write_converted(cache, list(range(num_blocks)), 0, tokens)
    return KvTransferAgent(f"src-{uuid.uuid4().hex[:8]}", cache)


@pytest.mark.parametrize(
    ("block_size", "dtype", "tolerance"),
    [
        (8, torch.float32, 0.0),  # block size only: exact
        (2, torch.bfloat16, 1e-2),
        (8, torch.float8_e4m3fn, 7e-2),  # e4m3 keeps 3 mantissa bits: 1/16 relative
    ],
)
async def test_read_converted_repacks_another_block_size_and_dtype(
    block_size: int, dtype: torch.dtype, tolerance: float
) -> None:
    tokens = torch.randn((40, 2, 2, 2, 8), generator=torch.Generator().manual_seed(3))
    layout = LAYOUT.with_changes(block_size=block_size, dtype=dtype)
    source = _source(layout, 40 // block_size, tokens)
    reader = _agent("decode")
    try:
        reader.add_peer(source.region())
        serving = asyncio.create_task(source.serve())
        skip, count = 6, 30  # from inside a source block, past a local block's end
        first, last = skip // block_size, -(-(skip + count) // block_size)
        local = [9, 2, 14, 5, 0, 11, 7, 3][: -(-count // LAYOUT.block_size)]
        result = await reader.read_converted(
            source.name,
            list(range(first, last)),
            local,
            skip=skip - first * block_size,
            num_tokens=count,
            notify=b"done",
        )
        assert result.num_blocks == last - first
        assert result.num_bytes == (last - first) * layout.bytes_per_block
        got = reader.kv_cache.read_values(local).transpose(1, 2).reshape(-1, 2, 2, 2, 8)[:count]
        want = tokens[skip : skip + count]
        assert torch.allclose(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item())
        untouched = [b for b in range(NUM_BLOCKS) if b not in local]
        assert not reader.kv_cache.tensor[untouched].any()
        notes = await source.wait_notifications(timeout_s=5)
        assert notes == [(reader.name, b"done")]
        with pytest.raises(LayoutMismatchError, match="read_converted"):
            await reader.read_blocks(source.name, [0], [0])
    finally:
        reader.close()
        source.close()
        await asyncio.wait_for(serving, timeout=5)


async def test_read_converted_works_in_chunks_through_a_small_staging_area() -> None:
    tokens = torch.randn((64, 2, 2, 2, 8), generator=torch.Generator().manual_seed(4))
    layout = LAYOUT.with_changes(block_size=8, dtype=torch.bfloat16)
    source = _source(layout, 8, tokens)
    cache = PagedKvCache(LAYOUT, NUM_BLOCKS, torch.device("cpu"))
    reader = KvTransferAgent(
        f"small-{uuid.uuid4().hex[:8]}", cache, staging_bytes=3 * layout.bytes_per_block
    )
    try:
        reader.add_peer(source.region())
        serving = asyncio.create_task(source.serve())
        local = list(range(15, -1, -1))
        await reader.read_converted(source.name, list(range(8)), local, skip=0, num_tokens=64)
        got = reader.kv_cache.read_values(local).transpose(1, 2).reshape(-1, 2, 2, 2, 8)
        assert torch.allclose(got, tokens.bfloat16().float())
        assert reader.stats.transfers == 1 and reader.stats.blocks_read == 8
    finally:
        reader.close()
        source.close()
        await asyncio.wait_for(serving, timeout=5)


def test_staging_smaller_than_a_block_is_a_clear_error() -> None:
    layout = LAYOUT.with_changes(block_size=8)
    source = _source(layout, 1, torch.zeros((8, 2, 2, 2, 8)))
    cache = PagedKvCache(LAYOUT, NUM_BLOCKS, torch.device("cpu"))
    reader = KvTransferAgent(f"tiny-{uuid.uuid4().hex[:8]}", cache, staging_bytes=16)
    try:
        reader.add_peer(source.region())
        with pytest.raises(TransferError, match="cannot hold one block"):
            asyncio.run(reader.read_converted(source.name, [0], [0, 1], skip=0, num_tokens=8))
    finally:
        reader.close()
        source.close()


async def test_fp8_blocks_into_an_fp8_cache_copy_as_they_are() -> None:
    """A prefill worker sending FP8 to a decode worker whose cache is FP8: equal layouts, so
    the READ lands in the cache byte for byte, scales included."""
    fp8 = LAYOUT.with_changes(dtype=torch.float8_e4m3fn)
    tokens = torch.randn((16, 2, 2, 2, 8), generator=torch.Generator().manual_seed(5))
    source = _source(fp8, 4, tokens)
    reader = KvTransferAgent(
        f"fp8-{uuid.uuid4().hex[:8]}", PagedKvCache(fp8, NUM_BLOCKS, torch.device("cpu"))
    )
    try:
        reader.add_peer(source.region())
        serving = asyncio.create_task(source.serve())
        result = await reader.read_blocks(source.name, [0, 1, 2, 3], [9, 4, 12, 1])
        assert result.num_bytes == 4 * fp8.bytes_per_block
        assert _bytes(reader.kv_cache, [9, 4, 12, 1]) == _bytes(source.kv_cache, [0, 1, 2, 3])
    finally:
        reader.close()
        source.close()
        await asyncio.wait_for(serving, timeout=5)
