"""paged_decode / paged_prefill against naive float64 attention over each sequence's context.

The reference gathers every context token one by one through the block table (a different path
from the code under test) and runs softmax attention with explicit GQA head repetition.
"""

from __future__ import annotations

import pytest
import torch

from kvmesh.engine.attention.paged import paged_decode, paged_prefill

_GARBAGE = (-1, 1 << 30)  # what unused block-table entries hold; reading either would fail


def _cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """Layer 1 of a 3-layer cache: a strided view, as the engine hands it over."""
    whole = torch.randn(num_blocks, 3, block_size, 2, num_kv_heads, head_dim, dtype=dtype)
    return whole[:, 1]


def _block_tables(
    context_lens: list[int], block_size: int, num_blocks: int, garbage: int, seed: int = 0
) -> torch.Tensor:
    """Each sequence gets distinct, shuffled blocks; the rest of its row is `garbage`."""
    needed = [-(-n // block_size) for n in context_lens]
    width = max(max(needed), 1) + 2
    ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = torch.full((len(context_lens), width), garbage, dtype=torch.int32)
    taken = 0
    for row, n in enumerate(needed):
        tables[row, :n] = torch.tensor(ids[taken : taken + n], dtype=torch.int32)
        taken += n
    return tables


def _context(layer_cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """[length, 2, Hkv, D], token by token through the table."""
    block_size = layer_cache.shape[1]
    rows = [layer_cache[int(table[p // block_size]), p % block_size] for p in range(length)]
    return torch.stack(rows) if rows else layer_cache.new_zeros(0, *layer_cache.shape[2:])


def _reference(
    q: torch.Tensor, context: torch.Tensor, positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [L, Hq, D] at `positions` over context [ctx, 2, Hkv, D]; float64 [L, Hq, D]."""
    group = q.shape[1] // context.shape[2]
    keys = context[:, 0].double().repeat_interleave(group, dim=1)
    values = context[:, 1].double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), keys) * scale
    visible = torch.arange(context.shape[0])[None, :] <= positions[:, None]
    probs = scores.masked_fill(~visible[None], float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, values)


def _decode_reference(
    q: torch.Tensor, layer_cache: torch.Tensor, tables: torch.Tensor, lens: list[int], scale: float
) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float64)
    for row, n in enumerate(lens):
        if n:
            context = _context(layer_cache, tables[row], n)
            out[row] = _reference(q[row : row + 1], context, torch.tensor([n - 1]), scale)[0]
    return out


def _strided_queries(
    batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """q as the model produces it: a view into the fused qkv projection."""
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(batch, width)
    return qkv[:, : num_q_heads * head_dim].view(batch, num_q_heads, head_dim)


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(8, 2), (4, 4)])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_decode_matches_naive_attention(
    block_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    torch.manual_seed(block_size + head_dim)
    bs = block_size
    # Contexts ending one before, exactly at and one after block boundaries, ragged, and empty.
    lens = [bs - 1, bs, bs + 1, 1, 0, 3 * bs + 5, 2 * bs]
    lens = [n for n in lens if n >= 0]
    layer_cache = _cache(64 if bs > 1 else 200, bs, num_kv_heads, head_dim, torch.float32)
    for garbage in _GARBAGE:
        tables = _block_tables(lens, bs, layer_cache.shape[0], garbage)
        q = _strided_queries(len(lens), num_q_heads, num_kv_heads, head_dim)
        scale = head_dim**-0.5
        out = paged_decode(q, layer_cache, tables, torch.tensor(lens), scale)
        expected = _decode_reference(q, layer_cache, tables, lens, scale)
        assert out.shape == q.shape and out.dtype == q.dtype
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_decode_empty_rows_are_zero_and_nothing_is_nan() -> None:
    layer_cache = _cache(8, 16, 2, 64, torch.float32)
    tables = _block_tables([0, 20, 0], 16, 8, garbage=-1)
    q = torch.randn(3, 4, 64)
    out = paged_decode(q, layer_cache, tables, torch.tensor([0, 20, 0]), 0.125)
    assert not out.isnan().any()
    assert (out[0] == 0).all() and (out[2] == 0).all()
    assert out[1].abs().sum() > 0


def test_decode_with_every_row_empty() -> None:
    layer_cache = _cache(4, 16, 2, 64, torch.float32)
    tables = torch.full((2, 3), -1, dtype=torch.int64)
    out = paged_decode(torch.randn(2, 4, 64), layer_cache, tables, torch.tensor([0, 0]), 0.125)
    assert (out == 0).all()


def test_decode_bf16_returns_bf16_close_to_float64() -> None:
    lens = [37, 5, 64]
    layer_cache = _cache(16, 16, 2, 64, torch.bfloat16)
    tables = _block_tables(lens, 16, 16, garbage=1 << 30)
    q = torch.randn(3, 8, 64, dtype=torch.bfloat16)
    out = paged_decode(q, layer_cache, tables, torch.tensor(lens), 0.125)
    expected = _decode_reference(q, layer_cache, tables, lens, 0.125)
    assert out.dtype == torch.bfloat16
    assert (out.double() - expected).norm() / expected.norm() < 1e-2


def test_decode_ignores_cache_contents_past_the_context() -> None:
    """Changing the unseen tail of the last block, or any unlisted block, changes nothing."""
    lens = [20]
    layer_cache = _cache(8, 16, 2, 64, torch.float32)
    tables = _block_tables(lens, 16, 8, garbage=-1)
    q = torch.randn(1, 4, 64)
    before = paged_decode(q, layer_cache, tables, torch.tensor(lens), 0.125)
    last = int(tables[0, 1])
    layer_cache[last, 4:] = float("nan")
    for block in set(range(8)) - {int(tables[0, 0]), last}:
        layer_cache[block] = float("nan")
    after = paged_decode(q, layer_cache, tables, torch.tensor(lens), 0.125)
    torch.testing.assert_close(after, before)


def _prefill_reference(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    tables: torch.Tensor,
    cu_seqlens: list[int],
    lens: list[int],
    scale: float,
) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float64)
    for segment, n in enumerate(lens):
        start, end = cu_seqlens[segment], cu_seqlens[segment + 1]
        positions = torch.arange(end - start) + (n - (end - start))
        context = _context(layer_cache, tables[segment], n)
        out[start:end] = _reference(q[start:end], context, positions, scale)
    return out


def _cu_seqlens(query_lens: list[int]) -> list[int]:
    cu = [0]
    for n in query_lens:
        cu.append(cu[-1] + n)
    return cu


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads", "head_dim"), [(8, 2, 64), (4, 4, 80)])
def test_prefill_matches_naive_attention(
    block_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    """Fresh prompts (context == queries) and prompts over a cached prefix, mixed."""
    torch.manual_seed(block_size)
    query_lens = [17, 1, 16, 40, 5, 33]
    lens = [17, 9, 16, 40 + block_size, 5 + 3 * block_size + 1, 33]
    cu = _cu_seqlens(query_lens)
    layer_cache = _cache(400, block_size, num_kv_heads, head_dim, torch.float32)
    tables = _block_tables(lens, block_size, 400, garbage=-1)
    q = torch.randn(cu[-1], num_q_heads, head_dim)
    scale = head_dim**-0.5
    out = paged_prefill(q, layer_cache, tables, torch.tensor(cu), torch.tensor(lens), scale)
    expected = _prefill_reference(q, layer_cache, tables, cu, lens, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_prefill_in_two_chunks_equals_one_pass() -> None:
    torch.manual_seed(1)
    layer_cache = _cache(16, 16, 2, 64, torch.float32)
    tables = _block_tables([70], 16, 16, garbage=1 << 30)
    q = torch.randn(70, 8, 64)
    whole = paged_prefill(q, layer_cache, tables, torch.tensor([0, 70]), torch.tensor([70]), 0.1)
    first = paged_prefill(
        q[:30], layer_cache, tables, torch.tensor([0, 30]), torch.tensor([30]), 0.1
    )
    second = paged_prefill(
        q[30:], layer_cache, tables, torch.tensor([0, 40]), torch.tensor([70]), 0.1
    )
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-5, atol=1e-5)


def test_prefill_many_segments_of_different_lengths() -> None:
    torch.manual_seed(2)
    generator = torch.Generator().manual_seed(3)
    query_lens = torch.randint(1, 30, (12,), generator=generator).tolist()
    prefixes = torch.randint(0, 50, (12,), generator=generator).tolist()
    lens = [n + p for n, p in zip(query_lens, prefixes, strict=True)]
    cu = _cu_seqlens(query_lens)
    layer_cache = _cache(128, 8, 2, 64, torch.float32)
    tables = _block_tables(lens, 8, 128, garbage=-1)
    q = torch.randn(cu[-1], 4, 64)
    out = paged_prefill(q, layer_cache, tables, torch.tensor(cu), torch.tensor(lens), 0.125)
    expected = _prefill_reference(q, layer_cache, tables, cu, lens, 0.125)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_decode_equals_a_one_query_prefill() -> None:
    """The last token of a prefill and a decode of the same context see the same keys."""
    lens = [23, 48]
    layer_cache = _cache(16, 16, 2, 64, torch.float32)
    tables = _block_tables(lens, 16, 16, garbage=-1)
    q = torch.randn(2, 4, 64)
    decoded = paged_decode(q, layer_cache, tables, torch.tensor(lens), 0.125)
    prefilled = paged_prefill(
        q, layer_cache, tables, torch.tensor([0, 1, 2]), torch.tensor(lens), 0.125
    )
    torch.testing.assert_close(decoded, prefilled, rtol=1e-5, atol=1e-5)
