"""FP8 (e4m3) KV with per-block scales: one scale per block, layer, K or V, and KV head.

A value is stored as `e4m3(x / scale)` and read as `e4m3 * scale`, with `scale = amax / 448`
over the block's tokens and head dimension (448 is e4m3's largest finite value). Blocks fill a
token at a time, so a write may meet a value larger than the block's scale allows: the scale
then grows to fit it and the tokens already in the block are re-quantized to the new scale (a
block's first write, at offset 0, starts it afresh). One write path serves the engine's cache
writes and the conversion of imported KV (`kvmesh.kv.convert`).

Works wherever torch has `float8_e4m3fn` (CPU and CUDA): the math is plain torch, in float32.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
_TINY = 1e-12  # the smallest scale: an all-zero block stays zero, never divides by zero


def quantize(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`values / scales` as e4m3, saturated (e4m3 has no infinity: overflow would be NaN).
    `scales` broadcasts against `values`."""
    return (values.float() / scales).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_blocks(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole blocks `[n, L, B, 2, H, D]` -> (e4m3 values, float32 scales `[n, L, 2, H]`)."""
    amax = values.abs().amax(dim=(2, 5)).float()  # over tokens and head dim
    scales = (amax / FP8_MAX).clamp_min_(_TINY)
    return quantize(values, scales[:, :, None, :, :, None]), scales


def write_tokens(
    data: torch.Tensor,
    scales: torch.Tensor,
    blocks: torch.Tensor,
    offsets: torch.Tensor,
    values: torch.Tensor,
) -> None:
    """Store tokens in an FP8 cache, growing block scales where a value needs it.

    `data` `[N, L, B, 2, H, D]` e4m3 and `scales` `[N, L, 2, H]` (or views of one layer with
    L = 1); token `t` of `values` `[T, L, 2, H, D]` goes to `(blocks[t], offsets[t])`. Tokens of
    a block are written in order: a block written from offset 0 holds nothing older.
    """
    touched, inverse = torch.unique(blocks, return_inverse=True)
    amax = values.abs().amax(dim=-1).float()  # [T, L, 2, H]
    index = inverse.view(-1, *([1] * (amax.dim() - 1))).expand_as(amax)
    needed = torch.zeros(
        (len(touched), *amax.shape[1:]), dtype=torch.float32, device=amax.device
    ).scatter_reduce_(0, index, amax, "amax")
    first = torch.full((len(touched),), 2**31 - 1, dtype=offsets.dtype, device=offsets.device)
    first = first.scatter_reduce_(0, inverse, offsets, "amin")
    fresh = (first == 0).view(-1, *([1] * (amax.dim() - 1)))
    old = torch.where(fresh, torch.zeros_like(needed), scales[touched])
    new = torch.maximum(old, needed / FP8_MAX).clamp_min_(_TINY)
    # Re-quantize what the blocks already hold to their new scales (a ratio of 1 keeps it).
    held = data[touched].float() * (old / new)[:, :, None, :, :, None]
    data[touched] = held.clamp_(-FP8_MAX, FP8_MAX).to(data.dtype)
    scales[touched] = new
    data[blocks, :, offsets] = quantize(values, new[inverse][..., None])
