"""The paged KV cache: one tensor for every block of every layer, allocated once.

Layout is block-major, `[num_blocks, num_layers, block_size, 2 (K, V), num_kv_heads, head_dim]`,
so each block is one contiguous region: a transfer agent registers the whole tensor once and
describes a block by a single (address, length) pair. Inside a layer's part of a block, K and V
of a token sit side by side: one write stores both, and a gathered sequence's keys form a
strided view without a copy. Attention reads a layer through a strided view and gathers the
blocks of a sequence through its block table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvmesh.kv.errors import LayoutMismatchError

_DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the name workers report and options take."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class KvLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.block_size, 2, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        return int(torch.Size(self.block_shape).numel()) * self.dtype.itemsize

    def fingerprint(self) -> str:
        """Equal fingerprints mean blocks can be copied byte for byte between two caches."""
        dtype = _DTYPE_NAMES.get(self.dtype, str(self.dtype))
        return (
            f"kvmesh-kv/v1:LT2HD:L{self.num_layers}:H{self.num_kv_heads}"
            f":D{self.head_dim}:B{self.block_size}:{dtype}"
        )


class PagedKvCache:
    def __init__(self, layout: KvLayout, num_blocks: int, device: torch.device) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        self.device = device
        self.tensor = torch.zeros(
            (num_blocks, *layout.block_shape), dtype=layout.dtype, device=device
        )
        # Per-layer strided views: [num_blocks, block_size, 2, num_kv_heads, head_dim].
        self.layers = [self.tensor[:, layer] for layer in range(layout.num_layers)]

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.layout.bytes_per_block

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A copy of the blocks' contents, `[len(block_ids), *block_shape]`."""
        return self.tensor[self._index(block_ids)].clone()

    def write_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Overwrite blocks with contents read from a cache of the same layout."""
        expected = (len(block_ids), *self.layout.block_shape)
        if tuple(data.shape) != expected or data.dtype != self.layout.dtype:
            raise LayoutMismatchError(
                f"blocks of shape {tuple(data.shape)} {data.dtype} do not fit "
                f"{expected} {self.layout.dtype}"
            )
        self.tensor[self._index(block_ids)] = data.to(self.device)

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(block_ids), dtype=torch.long, device=self.device)
