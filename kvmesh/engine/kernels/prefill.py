"""Paged prefill attention, FlashAttention-2 style, over a cached prefix.

Grid (query tiles, segments, q heads): a program owns BLOCK_M queries of one head of one
segment and walks the keys it may see in BLOCK_N tiles gathered through the block table, with
an online softmax in float32 (base 2) and both products as `tl.dot` on the input dtype (bf16
on the GPU) with float32 accumulation. Query i of a segment with n queries and context c sits
at position c - n + i: a fresh prompt, a prompt over a cached prefix and a chunk of a chunked
prefill are the same case.

Per program the keys split in two loops: the tiles every query of the tile sees (no masking
at all) and the few tiles on the diagonal (causal mask). Tiles wholly past the tile's last
query are never loaded. Tiles are taken last-first, so the programs with the most keys start
first and the short ones fill in at the end.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    block_m: int  # queries per program
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


def prefill_config(head_dim: int) -> PrefillConfig:
    """H100 defaults: 128x64 tiles as in FlashAttention-2 and vLLM's prefix_prefill; 8 warps
    for head_dim 128 (a 128x128 fp32 accumulator is 64 registers a thread at 8 warps), 4 for 64;
    wider heads halve the tiles to stay within registers and shared memory."""
    if head_dim <= 64:
        return PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=2)
    return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)


def choose_prefill_config(
    max_query_len: int, num_segments: int, num_q_heads: int, head_dim: int, num_sms: int
) -> PrefillConfig:
    """`prefill_config`, with half-height query tiles when full ones would leave SMs idle.

    One program per (query tile, segment, head): a 512-token chunk of one prompt is 4 tiles x
    32 heads = 128 programs, under one wave on an H100's 132 SMs, each walking the whole cached
    prefix alone. 64-query tiles double the programs (and halve each one's walk)."""
    config = prefill_config(head_dim)
    programs = -(-max_query_len // config.block_m) * num_segments * num_q_heads
    if config.block_m > 64 and programs < 2 * num_sms:
        return PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    return config


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # Triton's CPU interpreter: shape the grid as on an H100
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_prefill_attention(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    max_query_len: int,
    out: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Same contract as `kvmesh.engine.attention.paged.paged_prefill`; returns `out`.

    `max_query_len` (the longest segment, known on the host) sizes the grid so the call never
    reads device memory on the host. cu_seqlens_q, context_lens and block_tables are int32 or
    int64 on q's device.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, _, num_kv_heads, cache_head_dim = layer_cache.shape
    assert cache_head_dim == head_dim and num_q_heads % num_kv_heads == 0
    assert q.stride(2) == 1 and layer_cache.stride(4) == 1 and block_tables.stride(1) == 1
    if out is None:
        out = torch.empty_like(q)
    num_segments = cu_seqlens_q.shape[0] - 1
    if num_tokens == 0 or num_segments == 0 or max_query_len == 0:
        return out
    config = config or choose_prefill_config(
        max_query_len, num_segments, num_q_heads, head_dim, _num_sms(q.device)
    )
    grid = (triton.cdiv(max_query_len, config.block_m), num_segments, num_q_heads)
    _prefill_kernel[grid](
        q,
        layer_cache,
        block_tables,
        cu_seqlens_q,
        context_lens,
        out,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        layer_cache.stride(0),
        layer_cache.stride(1),
        layer_cache.stride(2),
        layer_cache.stride(3),
        block_tables.stride(0),
        GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_SIZE=block_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


@triton.jit  # type: ignore[untyped-decorator]
def _prefill_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    cu_seqlens_ptr,
    context_lens_ptr,
    out_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_kv,
    stride_cache_head,
    stride_table_seq,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    segment = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + segment)
    num_queries = tl.load(cu_seqlens_ptr + segment + 1) - q_start
    if tile * BLOCK_M >= num_queries:
        return
    context_len = tl.load(context_lens_ptr + segment)
    first_query_pos = context_len - num_queries + tile * BLOCK_M

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < num_queries
    query_pos = first_query_pos + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_q_token + head * stride_q_head + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )

    k_base = cache_ptr + (head // GROUP) * stride_cache_head
    v_base = k_base + stride_cache_kv
    table = block_tables_ptr + segment * stride_table_seq
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys up to the first query's position are visible to the whole tile; past the last
    # query's position, to none of it.
    unmasked_end = (first_query_pos + 1) // BLOCK_N * BLOCK_N
    keys_end = tl.minimum(first_query_pos + BLOCK_M, context_len)
    acc, m_i, l_i = _attend_keys(
        acc,
        m_i,
        l_i,
        q,
        query_pos,
        k_base,
        v_base,
        table,
        0,
        unmasked_end,
        qk_scale,
        stride_cache_block,
        stride_cache_slot,
        offs_d,
        mask_d,
        BLOCK_N,
        BLOCK_SIZE,
        False,
        DOT_PRECISION,
    )
    acc, m_i, l_i = _attend_keys(
        acc,
        m_i,
        l_i,
        q,
        query_pos,
        k_base,
        v_base,
        table,
        unmasked_end,
        keys_end,
        qk_scale,
        stride_cache_block,
        stride_cache_slot,
        offs_d,
        mask_d,
        BLOCK_N,
        BLOCK_SIZE,
        True,
        DOT_PRECISION,
    )

    # Every real query sees key 0, so l_i > 0 on the rows that are stored.
    result = acc / l_i[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_out_token + head * stride_out_head + offs_d[None, :],
        result.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


@triton.jit  # type: ignore[untyped-decorator]
def _attend_keys(  # type: ignore[no-untyped-def]
    acc,
    m_i,
    l_i,
    q,
    query_pos,
    k_base,
    v_base,
    table,
    keys_start,
    keys_end,
    qk_scale,
    stride_cache_block,
    stride_cache_slot,
    offs_d,
    mask_d,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The online-softmax update over keys [keys_start, keys_end), tile by tile."""
    for tile_start in range(keys_start, keys_end, BLOCK_N):
        offs_n = tile_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < keys_end
        block = tl.load(table + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        slot = block * stride_cache_block + (offs_n % BLOCK_SIZE) * stride_cache_slot
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + slot[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale
        if CAUSAL_MASK:
            visible = (offs_n[None, :] <= query_pos[:, None]) & mask_n[None, :]
            scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i
