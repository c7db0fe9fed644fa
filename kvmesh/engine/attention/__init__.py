"""Attention backends: how a layer's queries read K/V from the paged cache.

Chosen per worker (`--attention-backend`), so prefill and decode tiers may differ. Every
backend reads and writes the same cache layout (`kvmesh.kv.cache`), so KV moves between
workers on different backends byte for byte.

- `sdpa` (CPU, GPU): decode gathers every context, padded to the longest, for one SDPA call;
  prefill gathers the cached prefix and calls SDPA per segment.
- `paged` (CPU, GPU): pure PyTorch that reads blocks in place through the block tables (ragged,
  no padding; `paged.py`); the reference the GPU kernels are tested against.
- `triton` (CUDA): Triton kernels over the block tables (split-KV decode, FlashAttention-style
  prefill over a cached prefix), decode captured in CUDA graphs.

`triton` also brings the fused kernels (RMSNorm + residual, rotary + KV write, SiLU-mul)
through `kvmesh.engine.ops`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from kvmesh.engine.attention.common import AttentionMetadata, LayerCache, SequenceSlice
from kvmesh.errors import InvalidRequestError

BACKEND_NAMES = ("sdpa", "paged", "triton")


class AttentionBackend(Protocol):
    name: str
    fused_ops: bool  # whether the model runs the fused Triton kernels around attention

    def build(
        self, slices: Sequence[SequenceSlice], block_size: int, device: torch.device
    ) -> AttentionMetadata:
        """The step's metadata, once for every layer."""
        ...

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: LayerCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q `[T, Hq, D]`, the new k, v `[T, Hkv, D]` already in the cache -> `[T, Hq, D]`."""
        ...


def resolve_backend(name: str, device: torch.device) -> AttentionBackend:
    """The backend `name` asks for (`auto`: triton on CUDA, sdpa elsewhere), checked against
    the device: a clear error instead of a kernel that cannot run."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_available() else "sdpa"
    if name == "sdpa":
        from kvmesh.engine.attention.sdpa import SdpaBackend

        return SdpaBackend()
    if name == "paged":
        from kvmesh.engine.attention.paged_backend import PagedBackend

        return PagedBackend()
    if name == "triton":
        if device.type != "cuda":
            raise InvalidRequestError("attention backend 'triton' needs a CUDA device")
        if not _triton_available():
            raise InvalidRequestError("attention backend 'triton' needs the triton package")
        from kvmesh.engine.attention.triton_backend import TritonBackend

        return TritonBackend(device)
    raise InvalidRequestError(
        f"no attention backend {name!r}; backends: auto, {', '.join(BACKEND_NAMES)}"
    )


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
