"""Exported KV in another dtype than the cache's (`--transfer-dtype`): blocks of their own.

A prefill worker whose cache is 16-bit can send its exports in FP8, half the bytes over NIXL.
NIXL READs are one-sided, so the converted blocks must sit in registered memory before the
handle leaves: at the end of a prefill-only request the prompt's blocks are converted into
this pool's blocks (FP8 with per-block scales, `kvmesh.kv.quant`), and the export names those.
The cache's own blocks are not pinned: they stay in the prefix cache like any finished
request's. A lease's release frees the pool's blocks.

The pool has as many blocks as the cache; an export that finds it full fails its request with
RESOURCE_EXHAUSTED (the router tries another worker).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvmesh.errors import OverloadedError
from kvmesh.kv import quant
from kvmesh.kv.cache import KvLayout, PagedKvCache


class ExportPool:
    def __init__(self, source: PagedKvCache, layout: KvLayout, num_blocks: int) -> None:
        self.source = source
        self.cache = PagedKvCache(layout, num_blocks, source.device)
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() takes the lowest first

    @property
    def layout_fingerprint(self) -> str:
        return self.cache.layout.fingerprint()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def is_whole(self) -> bool:
        return len(self._free) == self.cache.num_blocks

    def export(self, block_ids: Sequence[int], num_tokens: int) -> list[int]:
        """Convert the cache's `block_ids` (holding `num_tokens` tokens) into pool blocks; their
        ids. Raises OverloadedError when the pool has too few free blocks."""
        if len(block_ids) > len(self._free):
            raise OverloadedError(
                f"no room to export {len(block_ids)} KV blocks in {self.cache.layout.fingerprint()}"
                f" ({len(self._free)} free)"
            )
        ids = [self._free.pop() for _ in block_ids]
        values = self.source.read_values(block_ids)
        filled = num_tokens - (len(block_ids) - 1) * self.source.layout.block_size
        values[-1, :, filled:] = 0.0  # stale slots past the prompt must not set a scale
        index = torch.as_tensor(ids, dtype=torch.long, device=self.cache.device)
        if self.cache.scales is not None:
            data, scales = quant.quantize_blocks(values)
            self.cache.data[index] = data
            self.cache.scales[index] = scales
        else:
            self.cache.data[index] = values.to(self.cache.layout.dtype)
        if self.cache.device.type == "cuda":
            # NIXL reads on streams of its own: the converted blocks must be whole first.
            torch.cuda.current_stream(self.cache.device).synchronize()
        return ids

    def release(self, block_ids: Sequence[int]) -> None:
        self._free.extend(block_ids)
