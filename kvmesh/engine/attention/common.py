"""What every attention backend shares: a step's shape, and the metadata built once per step.

A step is a flat batch: the scheduled tokens of every sequence concatenated. Each sequence
contributes a `SequenceSlice`: its new tokens (`num_query`), the tokens already in the cache
before them, and its block table. A slice with one query and earlier context is a decode row;
any other is a prefill segment (a prompt, a chunk of one, or a recompute), possibly over a
cached prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvmesh.engine.uploads import upload
from kvmesh.kv import quant
from kvmesh.kv.cache import LayerCache as LayerCache  # re-exported for the backends
from kvmesh.kv.cache import QuantizedLayer as QuantizedLayer


@dataclass(slots=True)
class SequenceSlice:
    """One sequence's part of a step, as the model runner describes it."""

    num_query: int
    num_context_before: int  # tokens already in the cache before this step
    block_ids: Sequence[int]

    @property
    def is_decode(self) -> bool:
        return self.num_query == 1 and self.num_context_before > 0

    @property
    def context_len(self) -> int:
        return self.num_context_before + self.num_query


def gather_blocks(layer_cache: LayerCache, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`layer_cache[index]` in `dtype`, dequantized if the cache is FP8."""
    if isinstance(layer_cache, QuantizedLayer):
        return layer_cache.gather(index).to(dtype)
    return layer_cache[index]


@dataclass(slots=True)
class AttentionMetadata:
    """Built once per step, read by every layer. Backends subclass it with their own fields."""

    slot_mapping: torch.Tensor  # [T] block * block_size + offset of each new token; -1: padding


def slot_list(slices: Sequence[SequenceSlice], block_size: int) -> list[int]:
    """Where each new token's K/V goes, `block * block_size + offset`, in the flat batch's order.

    Built a block's run of slots at a time (a 2048-token prompt is 128 `range`s, not 2048
    Python iterations): it is on every step's path."""
    slots: list[int] = []
    for s in slices:
        position = s.num_context_before
        while position < s.context_len:
            block, offset = divmod(position, block_size)
            run = min(block_size - offset, s.context_len - position)
            first = s.block_ids[block] * block_size + offset
            slots.extend(range(first, first + run))
            position += run
    return slots


def slot_mapping(
    slices: Sequence[SequenceSlice], block_size: int, device: torch.device
) -> torch.Tensor:
    """`slot_list` on the device."""
    return upload(slot_list(slices, block_size), torch.long, device)


def block_table(
    slices: Sequence[SequenceSlice], block_size: int, device: torch.device
) -> torch.Tensor:
    """`[len(slices), max blocks]` int32 block tables; entries past a row's blocks are 0."""
    tables = [list(s.block_ids[: -(-s.context_len // block_size)]) for s in slices]
    width = max((len(t) for t in tables), default=0)
    return upload([t + [0] * (width - len(t)) for t in tables], torch.int32, device)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    layer_cache: LayerCache,
    slots: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Store the new tokens' K and V in their cache slots, given as (blocks, offsets)."""
    kv = torch.stack((k, v), dim=1)
    if isinstance(layer_cache, QuantizedLayer):
        # As a cache of one layer: [N, 1, B, 2, H, D] values, [N, 1, 2, H] scales.
        quant.write_tokens(
            layer_cache.data.unsqueeze(1),
            layer_cache.scales.unsqueeze(1),
            slots[0],
            slots[1],
            kv.unsqueeze(1),
        )
    else:
        layer_cache[slots[0], slots[1]] = kv
