"""Rotary embedding applied in place to q and k of the fused qkv projection, with k and v
written to their paged-cache slots in the same pass.

The unfused path reads q and k to rotate them, writes them back, then reads k and v again to
scatter them into the cache; one program per token here reads each value once. The rotation is
the half-split (GPT-NeoX, transformers `rotate_half`) convention:

    out[:D/2] = x1 * cos - x2 * sin        out[D/2:] = x2 * cos + x1 * sin

with cos/sin from a float32 cache `[max_positions, D]` (cos in the first half of each row, sin
in the second, any attention scaling already applied), computed in float32 and rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rope_and_write_kv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    layer_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    """Rotate q and k inside qkv `[T, (Hq + 2*Hkv) * D]` and store k, v in the cache.

    positions: `[T]`; slot_mapping: `[T]`, token t's K/V goes to
    `layer_cache[slot // block_size, slot % block_size]`; a negative slot (padding) is skipped.
    layer_cache: `[num_blocks, block_size, 2, Hkv, D]`, any strides but the last.
    """
    num_tokens = qkv.shape[0]
    assert qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim and qkv.stride(1) == 1
    assert head_dim % 2 == 0 and cos_sin_cache.shape[1] == head_dim
    assert cos_sin_cache.stride(1) == 1 and layer_cache.stride(4) == 1
    if num_tokens == 0:
        return
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    _rope_and_write_kv_kernel[(num_tokens,)](
        qkv,
        positions,
        cos_sin_cache,
        layer_cache,
        slot_mapping,
        qkv.stride(0),
        cos_sin_cache.stride(0),
        layer_cache.stride(0),
        layer_cache.stride(1),
        layer_cache.stride(2),
        layer_cache.stride(3),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HALF=half,
        BLOCK_HALF=block_half,
        BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
        BLOCK_SIZE=layer_cache.shape[1],
        num_warps=4,
    )


@triton.jit  # type: ignore[untyped-decorator]
def _rotate(  # type: ignore[no-untyped-def]
    x_ptr, heads, num_heads, offs, mask_half, cos, sin, HALF: tl.constexpr
):
    """Rotates `heads` rows of D values at x_ptr in place; returns both rounded halves."""
    mask = (heads < num_heads)[:, None] & mask_half[None, :]
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0)
    first = (x1.to(tl.float32) * cos - x2.to(tl.float32) * sin).to(x1.dtype)
    second = (x2.to(tl.float32) * cos + x1.to(tl.float32) * sin).to(x1.dtype)
    tl.store(x_ptr + offs, first, mask=mask)
    tl.store(x_ptr + offs + HALF, second, mask=mask)
    return first, second, mask


@triton.jit  # type: ignore[untyped-decorator]
def _rope_and_write_kv_kernel(  # type: ignore[no-untyped-def]
    qkv_ptr,
    positions_ptr,
    cos_sin_ptr,
    cache_ptr,
    slot_mapping_ptr,
    stride_qkv_token,
    stride_cos_sin,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_kv,
    stride_cache_head,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    mask_half = offs < HALF
    cos = tl.load(cos_sin_ptr + position * stride_cos_sin + offs, mask=mask_half, other=0.0)
    sin = tl.load(cos_sin_ptr + position * stride_cos_sin + HALF + offs, mask=mask_half, other=0.0)
    cos = cos.to(tl.float32)[None, :]
    sin = sin.to(tl.float32)[None, :]
    row = qkv_ptr + token * stride_qkv_token

    q_heads = tl.arange(0, BLOCK_HQ)
    q_offs = q_heads[:, None] * HEAD_DIM + offs[None, :]
    _rotate(row, q_heads, NUM_HEADS, q_offs, mask_half, cos, sin, HALF)

    kv_heads = tl.arange(0, BLOCK_HKV)
    k_offs = NUM_HEADS * HEAD_DIM + kv_heads[:, None] * HEAD_DIM + offs[None, :]
    k1, k2, k_mask = _rotate(row, kv_heads, NUM_KV_HEADS, k_offs, mask_half, cos, sin, HALF)

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        cache_k = (
            cache_ptr
            + block * stride_cache_block
            + (slot % BLOCK_SIZE) * stride_cache_slot
            + kv_heads[:, None] * stride_cache_head
            + offs[None, :]
        )
        element = cache_ptr.dtype.element_ty
        tl.store(cache_k, k1.to(element), mask=k_mask)
        tl.store(cache_k + HALF, k2.to(element), mask=k_mask)
        v_offs = k_offs + NUM_KV_HEADS * HEAD_DIM
        v1 = tl.load(row + v_offs, mask=k_mask, other=0.0)
        v2 = tl.load(row + v_offs + HALF, mask=k_mask, other=0.0)
        tl.store(cache_k + stride_cache_kv, v1.to(element), mask=k_mask)
        tl.store(cache_k + stride_cache_kv + HALF, v2.to(element), mask=k_mask)
