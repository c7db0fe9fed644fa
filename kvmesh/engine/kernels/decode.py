"""Paged decode attention: one query token per sequence, split-KV in two kernels.

Stage 1, grid (batch, num_kv_heads, num_splits): a program takes the G = Hq / Hkv query heads
that share one KV head (padded to BLOCK_H >= 16 rows so QK^T and PV are `tl.dot`s: each K/V tile
is read once for the whole group), walks its split of the context in tiles of BLOCK_N tokens
gathered through the block table, and keeps an online softmax in float32 (base 2: scores are
pre-multiplied by log2(e) so `exp2` is one instruction). It writes its normalised partial output
and log-sum-exp. Stage 2, grid (batch, Hq), weighs the splits by their log-sum-exp.

Decode reads every cached K/V byte once and does ~2 flops per byte, so it is bound by memory
bandwidth; splitting the context is what gives small batches enough programs to fill the SMs.

CUDA graphs: the grids depend only on batch, heads and num_splits, never on context lengths;
each program derives its split from `context_lens` on the device. With `out` and `workspace`
passed in, a call allocates nothing. A row with context 0 (a padded graph slot) writes zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """Stage 1's launch parameters (stage 2 is tiny and fixed)."""

    block_n: int  # context tokens per tile
    num_warps: int
    num_stages: int  # software-pipelining depth of the K/V loads


def decode_config(head_dim: int) -> DecodeConfig:
    """Defaults for H100, in line with vLLM's and SGLang's grouped decode kernels.

    A [BLOCK_H=16, BLOCK_N] score tile is small, so 4 warps suffice; a 64-token tile is 16 KB
    of K and 16 KB of V at D=128 in bf16, loaded with 16-byte cp.async and double-buffered
    (num_stages=2), which with several programs per SM keeps enough bytes in flight to cover
    HBM latency. Wider heads halve the tile to stay within registers.
    `kvmesh.bench.kernels` sweeps the alternatives on the GPU.
    """
    if head_dim <= 128:
        return DecodeConfig(block_n=64, num_warps=4, num_stages=2)
    return DecodeConfig(block_n=32, num_warps=4, num_stages=2)


@dataclass(frozen=True, slots=True)
class DecodeWorkspace:
    """Stage 1's outputs, preallocated so that a captured CUDA graph allocates nothing."""

    partial_out: torch.Tensor  # [max_batch, Hq, max_splits, D] float32, normalised per split
    partial_lse: torch.Tensor  # [max_batch, Hq, max_splits] float32, base-2 log-sum-exp


def decode_workspace(
    max_batch: int, num_q_heads: int, head_dim: int, num_splits: int, device: torch.device | str
) -> DecodeWorkspace:
    """Room for any batch up to `max_batch` and any num_splits up to `num_splits`: one per
    captured graph is enough (every layer reuses it, the kernels run one after another)."""
    return DecodeWorkspace(
        partial_out=torch.empty(
            (max_batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=device
        ),
        partial_lse=torch.empty(
            (max_batch, num_q_heads, num_splits), dtype=torch.float32, device=device
        ),
    )


def choose_num_splits(
    batch: int,
    num_kv_heads: int,
    max_context: int,
    num_sms: int,
    *,
    min_tokens_per_split: int = 128,
    max_splits: int = 32,
) -> int:
    """Splits per sequence: enough stage-1 programs to fill every SM about four times over,
    each split still at least two 64-token tiles long. A power of two, so that few distinct
    values (each a compiled variant of stage 2) ever occur.

    >>> choose_num_splits(1, 8, 4096, 132), choose_num_splits(32, 8, 4096, 132)
    (32, 4)
    """
    programs = max(batch * num_kv_heads, 1)
    wanted = -(-4 * num_sms // programs)
    longest = max(max_context // min_tokens_per_split, 1)
    round_up = 1 << (wanted - 1).bit_length()
    round_down = 1 << (min(longest, max_splits).bit_length() - 1)
    return min(round_up, round_down)


def paged_decode_attention(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int,
    out: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Same contract as `kvmesh.engine.attention.paged.paged_decode`; returns `out`.

    q: `[B, Hq, D]` (rows may be strided); layer_cache: `[num_blocks, block_size, 2, Hkv, D]`,
    any strides but the last; block_tables: `[B', max_blocks]` with B' >= B; context_lens:
    `[B'']` int32/int64 with B'' >= B, on q's device (nothing is converted, so nothing is
    allocated). `workspace` must hold at least B rows and `num_splits` splits.
    """
    batch, num_q_heads, head_dim = q.shape
    _, block_size, _, num_kv_heads, cache_head_dim = layer_cache.shape
    assert cache_head_dim == head_dim and num_q_heads % num_kv_heads == 0
    assert q.stride(2) == 1 and layer_cache.stride(4) == 1 and block_tables.stride(1) == 1
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    if workspace is None:
        workspace = decode_workspace(batch, num_q_heads, head_dim, num_splits, q.device)
    partial_out, partial_lse = workspace.partial_out, workspace.partial_lse
    assert partial_out.shape[0] >= batch and partial_out.shape[2] >= num_splits
    config = config or decode_config(head_dim)
    group = num_q_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)

    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        layer_cache,
        block_tables,
        context_lens,
        partial_out,
        partial_lse,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        layer_cache.stride(0),
        layer_cache.stride(1),
        layer_cache.stride(2),
        layer_cache.stride(3),
        block_tables.stride(0),
        partial_out.stride(0),
        partial_out.stride(1),
        partial_out.stride(2),
        partial_lse.stride(0),
        partial_lse.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=config.block_n,
        BLOCK_SIZE=block_size,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    _decode_combine_kernel[(batch, num_q_heads)](
        partial_out,
        partial_lse,
        out,
        num_splits,
        partial_out.stride(0),
        partial_out.stride(1),
        partial_out.stride(2),
        partial_lse.stride(0),
        partial_lse.stride(1),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_S=triton.next_power_of_2(num_splits),
        num_warps=4,
    )
    return out


def _dot_precision(dtype: torch.dtype) -> str:
    """Full precision for float32 operands (TF32 would lose 13 mantissa bits); moot for bf16."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit  # type: ignore[untyped-decorator]
def _decode_split_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_q_batch,
    stride_q_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_kv,
    stride_cache_head,
    stride_table_batch,
    stride_part_batch,
    stride_part_head,
    stride_part_split,
    stride_lse_batch,
    stride_lse_head,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    context_len = tl.load(context_lens_ptr + seq)
    # Whole tiles per split, so only a sequence's last tile is partial.
    split_len = tl.cdiv(tl.cdiv(context_len, num_splits), BLOCK_N) * BLOCK_N
    split_start = split * split_len
    split_end = tl.minimum(split_start + split_len, context_len)

    offs_h = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + offs_h
    mask_h = offs_h < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_q_batch + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :],
        other=0.0,
    )

    k_base = cache_ptr + kv_head * stride_cache_head
    v_base = k_base + stride_cache_kv
    table = block_tables_ptr + seq * stride_table_batch
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for tile_start in range(split_start, split_end, BLOCK_N):
        offs_n = tile_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < split_end
        # Entries past the context are never read: the mask keeps garbage ids out.
        block = tl.load(table + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        slot = block * stride_cache_block + (offs_n % BLOCK_SIZE) * stride_cache_slot
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + slot[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(mask_n[None, :], scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (short context) leaves l_i = 0: it writes zeros and lse = -inf.
    has_keys = l_i > 0.0
    partial = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    part_rows = seq * stride_part_batch + heads * stride_part_head + split * stride_part_split
    tl.store(
        partial_out_ptr + part_rows[:, None] + offs_d[None, :],
        partial,
        mask=mask_h[:, None] & mask_d[None, :],
    )
    tl.store(
        partial_lse_ptr + seq * stride_lse_batch + heads * stride_lse_head + split,
        lse,
        mask=mask_h,
    )


@triton.jit  # type: ignore[untyped-decorator]
def _decode_combine_kernel(  # type: ignore[no-untyped-def]
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    num_splits,
    stride_part_batch,
    stride_part_head,
    stride_part_split,
    stride_lse_batch,
    stride_lse_head,
    stride_out_batch,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    lse = tl.load(
        partial_lse_ptr + seq * stride_lse_batch + head * stride_lse_head + offs_s,
        mask=offs_s < num_splits,
        other=float("-inf"),
    )
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # context 0: no NaN from -inf+inf
    weights = tl.exp2(lse - lse_max)  # 0 for empty splits
    has_keys = lse > float("-inf")
    partial = tl.load(
        partial_out_ptr
        + seq * stride_part_batch
        + head * stride_part_head
        + offs_s[:, None] * stride_part_split
        + offs_d[None, :],
        mask=has_keys[:, None] & mask_d[None, :],
        other=0.0,
    )
    total = tl.sum(weights, 0)
    combined = tl.sum(partial * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + seq * stride_out_batch + head * stride_out_head + offs_d,
        combined.to(out_ptr.dtype.element_ty),
        mask=mask_d,
    )
