"""The `triton` backend: Triton kernels over the block tables (CUDA only).

Decode rows go to the split-KV decode kernel (`kvmesh.engine.kernels.decode`); prefill
segments over a cached prefix to the FlashAttention-style kernel that reads the prefix where it
lies (`kvmesh.engine.kernels.prefill`). A batch of fresh prompts (no cached prefix) has its
K/V in hand already, so it goes to PyTorch's fused SDPA (FlashAttention) on those tensors.

Nothing in the decode path depends on tensor values on the host, so a decode step can be
captured in a CUDA graph (`kvmesh.engine.cuda_graphs`) with metadata over fixed buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvmesh.engine.attention.common import AttentionMetadata, LayerCache, SequenceSlice
from kvmesh.engine.attention.paged_backend import (
    DecodeRows,
    PagedMetadata,
    build_paged_metadata,
    gather_rows,
    one_group,
    scatter_rows,
)
from kvmesh.engine.attention.sdpa import _sdpa
from kvmesh.engine.kernels.decode import choose_num_splits, paged_decode_attention
from kvmesh.engine.kernels.prefill import paged_prefill_attention


@dataclass(slots=True)
class TritonMetadata(PagedMetadata):
    num_splits: int | None = None  # decode splits per sequence, chosen at the first layer


class TritonBackend:
    name = "triton"
    fused_ops = True

    def __init__(
        self,
        device: torch.device,
        *,
        fresh_prefill_with_sdpa: bool = True,
        num_sms: int | None = None,  # the GPU's, unless given (tests on Triton's interpreter)
    ) -> None:
        self._num_sms = num_sms or torch.cuda.get_device_properties(device).multi_processor_count
        self._fresh_prefill_with_sdpa = fresh_prefill_with_sdpa

    def build(
        self, slices: Sequence[SequenceSlice], block_size: int, device: torch.device
    ) -> TritonMetadata:
        base = build_paged_metadata(slices, block_size, device)
        return TritonMetadata(
            slot_mapping=base.slot_mapping,
            decode=base.decode,
            prefill=base.prefill,
        )

    def decode_metadata(
        self,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        *,
        max_context: int,
        num_kv_heads: int,
    ) -> TritonMetadata:
        """Metadata of an all-decode step over caller-owned buffers (for CUDA graphs): the
        kernels read whatever the buffers hold when the graph replays."""
        batch = slot_mapping.shape[0]
        return TritonMetadata(
            slot_mapping=slot_mapping,
            decode=DecodeRows(
                token_indices=None,
                block_tables=block_tables,
                context_lens=context_lens,
                max_context=max_context,
            ),
            prefill=None,
            num_splits=choose_num_splits(batch, num_kv_heads, max_context, self._num_sms),
        )

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: LayerCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        assert isinstance(meta, TritonMetadata)
        assert isinstance(layer_cache, torch.Tensor), "the Triton kernels read 16-bit KV"
        out = None if one_group(meta) else torch.empty_like(q)
        if (d := meta.decode) is not None:
            if meta.num_splits is None:
                batch = d.block_tables.shape[0]
                meta.num_splits = choose_num_splits(
                    batch, layer_cache.shape[3], d.max_context, self._num_sms
                )
            rows = paged_decode_attention(
                gather_rows(q, d.token_indices),
                layer_cache,
                d.block_tables,
                d.context_lens,
                scale,
                num_splits=meta.num_splits,
            )
            out = scatter_rows(out, rows, d.token_indices)
        if (p := meta.prefill) is not None:
            num_segments = p.context_lens.shape[0]
            if self._fresh_prefill_with_sdpa and len(p.fresh) == num_segments:
                rows = _fresh_prefill(
                    gather_rows(q, p.token_indices),
                    gather_rows(k, p.token_indices),
                    gather_rows(v, p.token_indices),
                    p.fresh,
                    scale,
                )
            else:
                rows = paged_prefill_attention(
                    gather_rows(q, p.token_indices),
                    layer_cache,
                    p.block_tables,
                    p.cu_seqlens_q,
                    p.context_lens,
                    scale,
                    max_query_len=p.max_query_len,
                )
            out = scatter_rows(out, rows, p.token_indices)
        assert out is not None
        return out


def _fresh_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: list[tuple[int, int]],
    scale: float,
) -> torch.Tensor:
    """Causal attention of prompts with no cached prefix, on their own K/V (FlashAttention)."""
    out = q if len(segments) == 1 else torch.empty_like(q)
    for start, num_query in segments:
        rows = slice(start, start + num_query)
        attended = _sdpa(
            q[rows].transpose(0, 1)[None],
            k[rows].transpose(0, 1)[None],
            v[rows].transpose(0, 1)[None],
            None,
            is_causal=True,
            scale=scale,
        )[0].transpose(0, 1)
        if len(segments) == 1:
            return attended
        out[rows] = attended
    return out
