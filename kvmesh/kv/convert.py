"""Re-pack KV blocks of one layout into a cache of another: block size and dtype.

A decode worker may use another block size or KV dtype than the prefill worker whose KV it
imports (`kvmesh.kv.layout` says which differences convert). It READs the prefill's blocks as
they are into a staging area (`kvmesh.kv.transfer.agent`), then `write_converted` lays their
tokens into its own blocks: dequantized to float32 where the source is FP8, re-quantized where
the cache is FP8, on the device the cache lives on.
"""

from __future__ import annotations

import torch

from kvmesh.kv import quant
from kvmesh.kv.cache import SCALE_DTYPE, KvLayout, PagedKvCache
from kvmesh.kv.errors import LayoutMismatchError


def read_raw_blocks(raw: torch.Tensor, layout: KvLayout) -> torch.Tensor:
    """Blocks of `layout` as raw bytes `[n, bytes_per_block]` -> float32 `[n, *block_shape]`."""
    n = raw.shape[0]
    if raw.dtype != torch.uint8 or raw.shape[1] != layout.bytes_per_block:
        raise LayoutMismatchError(
            f"raw blocks of {raw.shape[1]} bytes are not blocks of {layout.fingerprint()}"
        )
    split = layout.value_bytes_per_block
    values = raw[:, :split].contiguous().view(layout.dtype).view(n, *layout.block_shape).float()
    if layout.is_quantized:
        scales = raw[:, split:].contiguous().view(SCALE_DTYPE).view(n, *layout.scale_shape)
        values *= scales[:, :, None, :, :, None]
    return values


def write_converted(
    cache: PagedKvCache,
    block_ids: list[int] | torch.Tensor,
    first_offset: int,
    values: torch.Tensor,
) -> None:
    """Write tokens `[T, L, 2, H, D]` into `cache`, the first at offset `first_offset` of
    `block_ids[0]` and the rest after it, in order (converted to the cache's dtype)."""
    layout = cache.layout
    expected = (layout.num_layers, 2, layout.num_kv_heads, layout.head_dim)
    if tuple(values.shape[1:]) != expected:
        raise LayoutMismatchError(
            f"tokens of shape {tuple(values.shape[1:])} do not fit a cache of {expected}"
        )
    positions = torch.arange(values.shape[0], device=cache.device) + first_offset
    ids = torch.as_tensor(block_ids, dtype=torch.long, device=cache.device)
    blocks = ids[positions // layout.block_size]
    offsets = positions % layout.block_size
    values = values.to(cache.device)
    if cache.scales is not None:
        quant.write_tokens(cache.data, cache.scales, blocks, offsets, values)
    else:
        cache.data[blocks, :, offsets] = values.to(layout.dtype)


def tokens_of(blocks: torch.Tensor, skip: int, count: int) -> torch.Tensor:
    """Blocks `[n, L, B, 2, H, D]` as their tokens in order, from the `skip`-th, `count` of
    them: `[count, L, 2, H, D]`."""
    n, layers, block_size = blocks.shape[:3]
    flat = blocks.transpose(1, 2).reshape(n * block_size, layers, *blocks.shape[3:])
    if skip + count > flat.shape[0]:
        raise LayoutMismatchError(f"{n} blocks hold {flat.shape[0]} tokens, not {skip + count}")
    return flat[skip : skip + count]
