"""The `sdpa` backend: gathers each context from the cache and calls PyTorch's SDPA.

Once the new tokens' K/V are in their cache slots:

- a prefill segment (one sequence's chunk of prompt) attends causally over its whole context;
  when it has no earlier context it uses the fresh K/V directly and skips the gather;
- all decoding sequences (one query token each) go through one batched call, their contexts
  gathered from the cache and padded to the longest, with a mask for the padding.

The metadata is built once per step and shared by every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvmesh.engine.attention.common import (
    AttentionMetadata,
    LayerCache,
    SequenceSlice,
    gather_blocks,
    slot_mapping,
)
from kvmesh.engine.uploads import upload


@dataclass(slots=True)
class PrefillSegment:
    start: int
    num_query: int
    block_table: torch.Tensor  # the blocks covering the context
    context_len: int  # tokens visible to the segment's last query (earlier ones + this chunk)
    mask: torch.Tensor | None  # [num_query, context_len]; None when the context is the chunk


@dataclass(slots=True)
class DecodeBatch:
    token_indices: torch.Tensor  # [B] positions in the flat batch
    block_tables: torch.Tensor  # [B, max_blocks]
    mask: torch.Tensor  # [B, 1, 1, max_blocks * block_size], True where attended


@dataclass(slots=True)
class SdpaMetadata(AttentionMetadata):
    prefills: list[PrefillSegment]
    decode: DecodeBatch | None


class SdpaBackend:
    name = "sdpa"
    fused_ops = False

    def build(
        self, slices: Sequence[SequenceSlice], block_size: int, device: torch.device
    ) -> SdpaMetadata:
        return build_metadata(slices, block_size, device)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: LayerCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        assert isinstance(meta, SdpaMetadata)
        return sdpa_attention(q, k, v, layer_cache, meta, scale)


def build_metadata(
    slices: Sequence[SequenceSlice], block_size: int, device: torch.device
) -> SdpaMetadata:
    prefills: list[PrefillSegment] = []
    decode_rows: list[tuple[int, SequenceSlice]] = []
    start = 0
    for s in slices:
        if s.is_decode:
            decode_rows.append((start, s))
        else:
            prefills.append(_prefill_segment(start, s, block_size, device))
        start += s.num_query
    mapping = slot_mapping(slices, block_size, device)
    return SdpaMetadata(
        slot_mapping=mapping,
        prefills=prefills,
        decode=_decode_batch(decode_rows, block_size, device) if decode_rows else None,
    )


def _prefill_segment(
    start: int, s: SequenceSlice, block_size: int, device: torch.device
) -> PrefillSegment:
    context_len = s.num_context_before + s.num_query
    num_blocks = -(-context_len // block_size)
    mask = None
    if s.num_context_before:
        query_pos = torch.arange(s.num_query, device=device)[:, None] + s.num_context_before
        mask = torch.arange(context_len, device=device)[None, :] <= query_pos
    return PrefillSegment(
        start=start,
        num_query=s.num_query,
        block_table=upload(list(s.block_ids[:num_blocks]), torch.long, device),
        context_len=context_len,
        mask=mask,
    )


def _decode_batch(
    rows: list[tuple[int, SequenceSlice]], block_size: int, device: torch.device
) -> DecodeBatch:
    context_lens = [s.num_context_before + 1 for _, s in rows]
    max_blocks = -(-max(context_lens) // block_size)
    tables = [
        list(s.block_ids[: -(-n // block_size)])
        for (_, s), n in zip(rows, context_lens, strict=True)
    ]
    padded = [t + [0] * (max_blocks - len(t)) for t in tables]  # padding is masked out
    lens = upload(context_lens, torch.long, device)
    mask = torch.arange(max_blocks * block_size, device=device)[None, :] < lens[:, None]
    return DecodeBatch(
        token_indices=upload([start for start, _ in rows], torch.long, device),
        block_tables=upload(padded, torch.long, device),
        mask=mask[:, None, None, :],
    )


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_cache: LayerCache,
    meta: SdpaMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D], already in layer_cache [num_blocks, block_size, 2,
    Hkv, D]."""
    out = q.new_empty(q.shape) if meta.prefills else q
    for seg in meta.prefills:
        rows = slice(seg.start, seg.start + seg.num_query)
        if seg.mask is None:
            keys, values = k[rows], v[rows]
        else:
            context = gather_blocks(layer_cache, seg.block_table, q.dtype)
            context = context.flatten(0, 1)[: seg.context_len]
            keys, values = context[:, 0], context[:, 1]
        out[rows] = _sdpa(
            q[rows].transpose(0, 1)[None],
            keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None],
            seg.mask,
            is_causal=seg.mask is None,
            scale=scale,
        )[0].transpose(0, 1)
    if meta.decode is not None:
        d = meta.decode
        batch = d.block_tables.shape[0]
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        # One gather for every sequence's K and V: [B, max_blocks * block_size, 2, Hkv, D].
        context = gather_blocks(layer_cache, d.block_tables, q.dtype).flatten(1, 2)
        keys = context[:, :, 0].transpose(1, 2)  # [B, Hkv, S, D]
        values = context[:, :, 1].transpose(1, 2)
        # The query heads sharing a KV head become that head's "query positions": one
        # attention per KV head, without expanding K and V for grouped-query attention.
        only_decodes = not meta.prefills
        queries = q if only_decodes else q[d.token_indices]
        queries = queries.view(batch, num_kv_heads, -1, head_dim)
        attended = F.scaled_dot_product_attention(queries, keys, values, d.mask, scale=scale)
        if only_decodes:  # the batch is exactly the decode rows, in order
            return attended.reshape(batch, -1, head_dim)
        out[d.token_indices] = attended.reshape(batch, -1, head_dim)
    return out


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
