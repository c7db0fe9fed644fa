"""The paged KV cache: one tensor for every block of every layer, allocated once.

Layout is block-major, `[num_blocks, num_layers, block_size, 2 (K, V), num_kv_heads, head_dim]`,
so each block is one contiguous region: a transfer agent registers the whole tensor once and
describes a block by a single (address, length) pair. Inside a layer's part of a block, K and V
of a token sit side by side: one write stores both, and a gathered sequence's keys form a
strided view without a copy. Attention reads a layer through a strided view and gathers the
blocks of a sequence through its block table.

An FP8 cache (`fp8_e4m3`) keeps each block's scales inside the block, after its values: a
block is `[layers, tokens, 2, KV heads, head dim]` e4m3 values then `[layers, 2, KV heads]`
float32 scales (one per block, layer, K or V, and head; value = e4m3 * scale), so a block is
still one region that moves, scales and all, in one descriptor (`kvmesh.kv.quant`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvmesh.kv.errors import LayoutMismatchError
from kvmesh.kv.layout import parse

FP8 = torch.float8_e4m3fn
# The dtype's short name in a layout fingerprint, and the name options take and workers report.
_DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", FP8: "e4m3"}
_KV_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp8_e4m3": FP8,
}
SCALE_DTYPE = torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16, 'fp8_e4m3' for e4m3: the name workers report and options
    take."""
    for name, known in _KV_DTYPES.items():
        if known == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def kv_dtype(name: str) -> torch.dtype:
    """The torch dtype of a KV dtype name (`float32`, `bfloat16`, `float16`, `fp8_e4m3`) or of
    a fingerprint's short name (`f32`, `e4m3`, ...); KeyError for any other."""
    if name in _KV_DTYPES:
        return _KV_DTYPES[name]
    for dtype, short in _DTYPE_NAMES.items():
        if short == name:
            return dtype
    raise KeyError(name)


@dataclass(frozen=True, slots=True)
class QuantizedLayer:
    """One layer of an FP8 cache (`kvmesh.kv.cache`): e4m3 values and their per-block scales."""

    data: torch.Tensor  # [num_blocks, block_size, 2, num_kv_heads, head_dim] e4m3
    scales: torch.Tensor  # [num_blocks, 2, num_kv_heads] float32

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The blocks `index` names, dequantized to float32: `[*index.shape, *block]`."""
        return self.data[index].float() * self.scales[index].unsqueeze(-3).unsqueeze(-1)


LayerCache = torch.Tensor | QuantizedLayer
"""A layer of the paged cache as backends see it: a tensor, or FP8 values with scales."""


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
    def is_quantized(self) -> bool:
        """Values in FP8 with per-block scales after them (see the module docstring)."""
        return self.dtype == FP8

    @property
    def scale_shape(self) -> tuple[int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads)

    @property
    def value_bytes_per_block(self) -> int:
        return int(torch.Size(self.block_shape).numel()) * self.dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        scales = int(torch.Size(self.scale_shape).numel()) * SCALE_DTYPE.itemsize
        return self.value_bytes_per_block + (scales if self.is_quantized else 0)

    def with_changes(
        self, *, block_size: int | None = None, dtype: torch.dtype | None = None
    ) -> KvLayout:
        return KvLayout(
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            block_size or self.block_size,
            dtype or self.dtype,
        )

    @classmethod
    def from_fingerprint(cls, fingerprint: str) -> KvLayout:
        """The layout a `kvmesh-kv/v1` fingerprint names; LayoutMismatchError for another."""
        spec = parse(fingerprint)
        if spec.is_opaque or spec.order != "LT2HD" or spec.dtype is None:
            raise LayoutMismatchError(f"not a kvmesh KV layout: {fingerprint}")
        try:
            dtype = kv_dtype(spec.dtype)
        except KeyError:
            raise LayoutMismatchError(f"unknown KV dtype {spec.dtype!r} in {fingerprint}") from None
        assert spec.num_layers and spec.num_kv_heads and spec.head_dim and spec.block_size
        return cls(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.block_size, dtype)

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
        self.scales: torch.Tensor | None = None
        if layout.is_quantized:
            # Raw bytes, each block its values then its scales; typed views over both.
            self.tensor = torch.zeros(
                (num_blocks, layout.bytes_per_block), dtype=torch.uint8, device=device
            )
            values = layout.value_bytes_per_block
            self.data = (
                self.tensor[:, :values].view(layout.dtype).view(num_blocks, *layout.block_shape)
            )
            self.scales = (
                self.tensor[:, values:].view(SCALE_DTYPE).view(num_blocks, *layout.scale_shape)
            )
        else:
            self.tensor = torch.zeros(
                (num_blocks, *layout.block_shape), dtype=layout.dtype, device=device
            )
            self.data = self.tensor
        # Per-layer strided views: [num_blocks, block_size, 2, num_kv_heads, head_dim] (and,
        # for FP8, the layer's scales [num_blocks, 2, num_kv_heads] with them).
        self.layers: list[LayerCache] = [
            self.data[:, n]
            if self.scales is None
            else QuantizedLayer(self.data[:, n], self.scales[:, n])
            for n in range(layout.num_layers)
        ]

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.layout.bytes_per_block

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A copy of the blocks as stored (`[n, *block_shape]`; raw bytes `[n, bytes_per_block]`
        for FP8), for `write_blocks` of a cache of the same layout."""
        return self.tensor[self._index(block_ids)].clone()

    def write_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Overwrite blocks with contents read from a cache of the same layout."""
        expected = (len(block_ids), *self.tensor.shape[1:])
        if tuple(data.shape) != expected or data.dtype != self.tensor.dtype:
            raise LayoutMismatchError(
                f"blocks of shape {tuple(data.shape)} {data.dtype} do not fit "
                f"{expected} {self.tensor.dtype}"
            )
        self.tensor[self._index(block_ids)] = data.to(self.device)

    def read_values(self, block_ids: Sequence[int]) -> torch.Tensor:
        """The blocks' K and V in float32, `[n, *block_shape]` (dequantized for FP8)."""
        index = self._index(block_ids)
        values = self.data[index].float()
        if self.scales is not None:
            values *= self.scales[index][:, :, None, :, :, None]
        return values

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(block_ids), dtype=torch.long, device=self.device)
