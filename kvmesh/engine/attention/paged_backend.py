"""The `paged` backend (pure PyTorch, in place) and the metadata it shares with `triton`.

Both see a step as decode rows (one query each) and prefill segments (any number of queries
over a cached prefix), each read through block tables with context lengths: no context is
gathered and padded, so the work follows the tokens in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvmesh.engine.attention.common import (
    AttentionMetadata,
    LayerCache,
    SequenceSlice,
    block_table,
    slot_mapping,
)
from kvmesh.engine.attention.paged import paged_decode, paged_prefill
from kvmesh.engine.uploads import upload


@dataclass(slots=True)
class DecodeRows:
    token_indices: torch.Tensor | None  # rows of the flat batch; None: every row, in order
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B], each row's context, its own token included
    max_context: int


@dataclass(slots=True)
class PrefillRows:
    token_indices: torch.Tensor | None  # rows of the flat batch; None: every row, in order
    block_tables: torch.Tensor  # [S, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [S + 1] int32
    context_lens: torch.Tensor  # [S], each segment's context, its own queries included
    max_query_len: int
    fresh: list[tuple[int, int]]  # (start, num_query) of segments with no cached prefix


@dataclass(slots=True)
class PagedMetadata(AttentionMetadata):
    decode: DecodeRows | None
    prefill: PrefillRows | None


def build_paged_metadata(
    slices: Sequence[SequenceSlice], block_size: int, device: torch.device
) -> PagedMetadata:
    decodes: list[tuple[int, SequenceSlice]] = []
    prefills: list[tuple[int, SequenceSlice]] = []
    start = 0
    for s in slices:
        (decodes if s.is_decode else prefills).append((start, s))
        start += s.num_query
    mapping = slot_mapping(slices, block_size, device)
    return PagedMetadata(
        slot_mapping=mapping,
        decode=_decode_rows(decodes, len(slices), block_size, device) if decodes else None,
        prefill=_prefill_rows(prefills, len(slices), block_size, device) if prefills else None,
    )


def _token_indices(rows: list[int], covers_all: bool, device: torch.device) -> torch.Tensor | None:
    """The group's rows of the flat batch; None when the group is the whole batch, in order."""
    return None if covers_all else upload(rows, torch.long, device)


def _decode_rows(
    rows: list[tuple[int, SequenceSlice]], num_slices: int, block_size: int, device: torch.device
) -> DecodeRows:
    slices = [s for _, s in rows]
    return DecodeRows(
        token_indices=_token_indices([i for i, _ in rows], len(rows) == num_slices, device),
        block_tables=block_table(slices, block_size, device),
        context_lens=upload([s.context_len for s in slices], torch.int32, device),
        max_context=max(s.context_len for s in slices),
    )


def _prefill_rows(
    rows: list[tuple[int, SequenceSlice]], num_slices: int, block_size: int, device: torch.device
) -> PrefillRows:
    slices = [s for _, s in rows]
    indices: list[int] = []
    cu = [0]
    fresh: list[tuple[int, int]] = []
    for start, s in rows:
        if s.num_context_before == 0:
            fresh.append((cu[-1], s.num_query))
        indices += range(start, start + s.num_query)
        cu.append(cu[-1] + s.num_query)
    return PrefillRows(
        token_indices=_token_indices(indices, len(rows) == num_slices, device),
        block_tables=block_table(slices, block_size, device),
        cu_seqlens_q=upload(cu, torch.int32, device),
        context_lens=upload([s.context_len for s in slices], torch.int32, device),
        max_query_len=max(s.num_query for s in slices),
        fresh=fresh,
    )


def gather_rows(x: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
    return x if indices is None else x.index_select(0, indices)


def scatter_rows(
    out: torch.Tensor | None, rows: torch.Tensor, indices: torch.Tensor | None
) -> torch.Tensor:
    """Put a group's output rows into the step's output (allocated on first use)."""
    if indices is None:
        return rows
    assert out is not None
    out.index_copy_(0, indices, rows)
    return out


class PagedBackend:
    name = "paged"
    fused_ops = False

    def build(
        self, slices: Sequence[SequenceSlice], block_size: int, device: torch.device
    ) -> PagedMetadata:
        return build_paged_metadata(slices, block_size, device)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: LayerCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        assert isinstance(meta, PagedMetadata)
        out = None if one_group(meta) else torch.empty_like(q)
        if (d := meta.decode) is not None:
            rows = paged_decode(
                gather_rows(q, d.token_indices), layer_cache, d.block_tables, d.context_lens, scale
            )
            out = scatter_rows(out, rows, d.token_indices)
        if (p := meta.prefill) is not None:
            rows = paged_prefill(
                gather_rows(q, p.token_indices),
                layer_cache,
                p.block_tables,
                p.cu_seqlens_q,
                p.context_lens,
                scale,
            )
            out = scatter_rows(out, rows, p.token_indices)
        assert out is not None
        return out


def one_group(meta: PagedMetadata) -> bool:
    """Every row is a decode row, or every row is a prefill row: outputs need no scatter."""
    groups = [g for g in (meta.decode, meta.prefill) if g is not None]
    return len(groups) == 1 and groups[0].token_indices is None
