"""Paged attention in pure PyTorch: the CPU backend and the reference the GPU kernels must match.

Both functions read K/V in place through block tables from one layer's view of the cache,
`layer_cache[num_blocks, block_size, 2, num_kv_heads, head_dim]` (K at 0, V at 1 of dim 2; a
strided view of the whole cache, so only the last dim is assumed contiguous). Block-table
entries past a sequence's own blocks may hold anything: they are never dereferenced.

Decode (one query per sequence) is the split-KV algorithm of the GPU kernel with one split per
cache block, vectorised over the whole batch:

    valid blocks of every sequence, flattened  ->  index_select from the cache (no padding)
    per block: scores = q[seq of block] @ K^T   (bmm, the query heads grouped per KV head)
               m = max(scores), w = exp(scores - m), l = sum(w), o = w @ V
    per sequence: M = max of its blocks' m; out = sum(exp(m - M) * o) / sum(exp(m - M) * l)

so the work is proportional to the tokens in the batch, not to batch * longest context, and
the number of torch ops per call is fixed. Blocks merge per sequence through small padded
tables of per-block statistics (index_put, dense reductions) rather than scatter-adds, which
run serially on CPU.

Prefill (compute-bound) loops over segments and calls scaled_dot_product_attention with a
causal mask offset by the segment's cached prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvmesh.engine.attention.common import LayerCache, QuantizedLayer, gather_blocks


def paged_decode(
    q: torch.Tensor,
    layer_cache: LayerCache,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over its cached context; returns `[B, Hq, D]` in q.dtype.

    q: `[B, Hq, D]`; block_tables: `[B, max_blocks]`; context_lens: `[B]`, the tokens each query
    sees, its own included (its K/V is already in the cache). A row with context 0 gives zeros.
    Query head h reads KV head h // (Hq // Hkv). Computes in float32.
    """
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = layer_cache.shape[1], layer_cache.shape[3]
    group = num_q_heads // num_kv_heads
    device = q.device
    if batch == 0:
        return torch.empty_like(q)
    lens = context_lens.to(device=device, dtype=torch.long)
    blocks_per_seq = (lens + block_size - 1) // block_size
    # The one host sync: sizes of the ragged block list and of the per-block statistics.
    num_blocks, max_blocks = torch.stack([blocks_per_seq.sum(), blocks_per_seq.max()]).tolist()
    if num_blocks == 0:
        return torch.zeros_like(q)
    seq_of_block = torch.repeat_interleave(
        torch.arange(batch, device=device), blocks_per_seq, output_size=num_blocks
    )
    first_block = torch.cumsum(blocks_per_seq, 0) - blocks_per_seq
    block_in_seq = torch.arange(num_blocks, device=device) - first_block[seq_of_block]
    block_ids = block_tables[seq_of_block, block_in_seq].long()

    # Gathered straight into [N, Hkv, bs, D]: the matmuls below then need no copies.
    if isinstance(layer_cache, QuantizedLayer):
        blocks = layer_cache.gather(block_ids)
        keys = blocks[:, :, 0].transpose(1, 2).contiguous()
        values = blocks[:, :, 1].transpose(1, 2).contiguous()
    else:
        keys = layer_cache[:, :, 0].transpose(1, 2).index_select(0, block_ids).float()
        values = layer_cache[:, :, 1].transpose(1, 2).index_select(0, block_ids).float()
    positions = block_in_seq[:, None] * block_size + torch.arange(block_size, device=device)
    past_end = positions >= lens[seq_of_block][:, None]  # [N, bs]
    # Slots past the end (only in each sequence's last block) may hold anything, NaN
    # included: a zero weight times NaN is NaN, so their values are zeroed. An empty
    # sequence's index lands on another last block, which this leaves as it was.
    last = (first_block + blocks_per_seq - 1).clamp_min(0)
    values[last] = values[last].masked_fill(past_end[last][:, None, :, None], 0.0)

    queries = q.float()[seq_of_block].view(num_blocks, num_kv_heads, group, head_dim)
    scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(scale)  # [N, Hkv, G, bs]
    scores.masked_fill_(past_end[:, None, None, :], float("-inf"))
    block_max = scores.amax(-1, keepdim=True)  # finite: a block has at least one key
    weights = scores.sub_(block_max).exp_()
    # Per block: the weighted values and, in the last column, the sum of the weights.
    block_stats = torch.cat((torch.matmul(weights, values), weights.sum(-1, keepdim=True)), -1)

    # Blocks merge per sequence through small padded tables of their statistics (G*(D+1)
    # numbers a block, against the bs*2*D of its K/V): the context itself is never padded.
    stats_shape = (batch, max_blocks, num_kv_heads, group)
    padded_max = torch.full((*stats_shape, 1), float("-inf"), device=device)
    padded_max[seq_of_block, block_in_seq] = block_max
    padded_stats = torch.zeros((*stats_shape, head_dim + 1), device=device)
    padded_stats[seq_of_block, block_in_seq] = block_stats
    seq_max = padded_max.amax(1, keepdim=True).nan_to_num_(neginf=0.0)  # 0 for empty rows
    merged = (padded_stats * torch.exp(padded_max - seq_max)).sum(1)  # [B, Hkv, G, D + 1]
    # A non-empty row's weight sum is >= 1 (its top key scores exp(0)), so the clamp changes
    # nothing there and turns an empty row's 0/0 into 0/1.
    out = merged[..., :head_dim] / merged[..., head_dim:].clamp_min(1.0)
    return out.view(batch, num_q_heads, head_dim).to(q.dtype)


def paged_prefill(
    q: torch.Tensor,
    layer_cache: LayerCache,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of S query segments over their cached contexts; returns `[T, Hq, D]`.

    q: `[T, Hq, D]`, the segments concatenated; cu_seqlens_q: `[S+1]` segment offsets into q;
    block_tables: `[S, max_blocks]`; context_lens: `[S]`, each segment's whole context, its own
    queries included (their K/V is already in the cache). Query i of a segment of n queries sits
    at position context_len - n + i and sees the keys at positions up to its own: this covers a
    fresh prompt, a prompt over a cached prefix and a chunk of a chunked prefill alike.
    """
    out = torch.empty_like(q)
    block_size, num_kv_heads = layer_cache.shape[1], layer_cache.shape[3]
    starts = cu_seqlens_q.tolist()
    for segment, context_len in enumerate(context_lens.tolist()):
        start, end = starts[segment], starts[segment + 1]
        num_query = end - start
        if num_query == 0:
            continue
        num_blocks = -(-context_len // block_size)
        table = block_tables[segment, :num_blocks].to(device=q.device, dtype=torch.long)
        context = gather_blocks(layer_cache, table, q.dtype).flatten(0, 1)[:context_len]
        keys = context[:, 0].transpose(0, 1)[None]  # [1, Hkv, ctx, D]
        values = context[:, 1].transpose(0, 1)[None]
        mask = None
        if context_len > num_query:  # queries sit after a prefix: causal, offset by it
            query_pos = torch.arange(num_query, device=q.device) + (context_len - num_query)
            mask = torch.arange(context_len, device=q.device)[None, :] <= query_pos[:, None]
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1)[None],
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=q.shape[1] != num_kv_heads,
        )[0].transpose(0, 1)
    return out
