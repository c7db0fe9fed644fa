"""Every Triton kernel against the PyTorch references, run by Triton's CPU interpreter.

The kernel modules are loaded afresh, under private names, with TRITON_INTERPRET=1 set while
their `@triton.jit` decorators run (the decorator reads it then, not at launch): the result
does not depend on whether something imported `kvmesh.engine.kernels` earlier, and nothing
leaks to other tests (a GPU test in the same session still gets compiled kernels).

Interpreter caveats: `tl.dot` on bf16 operands is wrong in the interpreter and its fp32 -> bf16
casts do not round to nearest, so attention runs in float32 here and the rounding checks use
float16; tests/gpu/test_triton_kernels.py repeats the checks in bf16 on CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from kvmesh.engine.attention.paged import paged_decode, paged_prefill
from tests.unit.engine.triton_interpreter import Kernels, interpreted_kernels


@pytest.fixture(scope="module")
def kernels() -> Iterator[Kernels]:
    with interpreted_kernels() as loaded:
        yield loaded


# --- paged caches ------------------------------------------------------------------------------


def _cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Layer 1 of a 2-layer cache (a strided view), its unused slots NaN like fresh memory."""
    whole = torch.full((num_blocks, 2, block_size, 2, num_kv_heads, head_dim), float("nan"))
    return whole.to(dtype)[:, 1]


def _fill(layer_cache: torch.Tensor, lens: list[int], garbage: int, seed: int = 0) -> torch.Tensor:
    """Gives each sequence shuffled blocks, writes random K/V into its context slots only, and
    returns int32 block tables whose unused entries hold `garbage`."""
    generator = torch.Generator().manual_seed(seed)
    block_size = layer_cache.shape[1]
    needed = [-(-n // block_size) for n in lens]
    ids = torch.randperm(layer_cache.shape[0], generator=generator).tolist()
    tables = torch.full((len(lens), max(needed + [1]) + 1), garbage, dtype=torch.int32)
    taken = 0
    for row, (n, count) in enumerate(zip(lens, needed, strict=True)):
        tables[row, :count] = torch.tensor(ids[taken : taken + count], dtype=torch.int32)
        taken += count
        for position in range(n):
            slot = layer_cache[ids[taken - count + position // block_size], position % block_size]
            slot.copy_(torch.randn(slot.shape, generator=generator))
    return tables


def _queries(rows: int, num_q_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """A strided view into a fused qkv buffer, as the model produces q."""
    qkv = torch.randn(rows, (num_q_heads + 2 * num_kv_heads) * head_dim)
    return qkv[:, : num_q_heads * head_dim].view(rows, num_q_heads, head_dim)


# --- decode ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block_size", "num_q_heads", "num_kv_heads", "head_dim", "num_splits", "block_n"),
    [
        (16, 8, 2, 64, 1, 16),  # GQA, one split
        (16, 8, 2, 64, 4, 32),  # several splits, some of them empty
        (1, 4, 4, 80, 3, 16),  # MHA, block size 1, head_dim not a power of two
        (32, 16, 1, 64, 2, 16),  # MQA: 16 heads on one KV head, a tile spans blocks
        (8, 40, 2, 32, 2, 32),  # group of 20 pads to BLOCK_H 32
    ],
)
def test_decode_matches_the_reference(
    kernels: Kernels,
    block_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    num_splits: int,
    block_n: int,
) -> None:
    torch.manual_seed(block_size * head_dim)
    bs = block_size
    lens = [n for n in (bs - 1, bs, bs + 1, 0, 3 * bs + 5, 70) if n >= 0]
    layer_cache = _cache(max(64, sum(lens) // bs + 16), bs, num_kv_heads, head_dim)
    config = kernels.decode.DecodeConfig(block_n=block_n, num_warps=4, num_stages=2)
    for garbage, lens_dtype in ((-1, torch.int32), (1 << 30, torch.int64)):
        tables = _fill(layer_cache, lens, garbage)
        q = _queries(len(lens), num_q_heads, num_kv_heads, head_dim)
        context_lens = torch.tensor(lens, dtype=lens_dtype)
        out = kernels.decode.paged_decode_attention(
            q,
            layer_cache,
            tables,
            context_lens,
            head_dim**-0.5,
            num_splits=num_splits,
            config=config,
        )
        expected = paged_decode(q, layer_cache, tables, context_lens, head_dim**-0.5)
        assert out.shape == q.shape and out.dtype == q.dtype
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_into_preallocated_buffers_overwrites_them(kernels: Kernels) -> None:
    """The CUDA-graph call: fixed out/workspace larger than needed, poisoned beforehand; padded
    rows (context 0) come out as zeros, never NaN."""
    lens = [0, 33, 0, 17]
    layer_cache = _cache(16, 16, 2, 64)
    tables = _fill(layer_cache, lens, garbage=-1)
    q = _queries(4, 8, 2, 64)
    workspace = kernels.decode.decode_workspace(8, 8, 64, 8, "cpu")
    workspace.partial_out.fill_(float("nan"))
    workspace.partial_lse.fill_(float("nan"))
    out = torch.full((6, 8, 64), float("nan"))[:4]
    result = kernels.decode.paged_decode_attention(
        q,
        layer_cache,
        tables,
        torch.tensor(lens),
        0.125,
        num_splits=4,
        out=out,
        workspace=workspace,
    )
    assert result is out
    assert not out.isnan().any()
    assert (out[0] == 0).all() and (out[2] == 0).all()
    expected = paged_decode(q, layer_cache, tables, torch.tensor(lens), 0.125)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_default_config_and_every_split_count_agree(kernels: Kernels) -> None:
    lens = [130, 1, 64]
    layer_cache = _cache(24, 16, 2, 64)
    tables = _fill(layer_cache, lens, garbage=-1)
    q = _queries(3, 8, 2, 64)
    expected = paged_decode(q, layer_cache, tables, torch.tensor(lens), 0.125)
    for num_splits in (1, 2, 5):
        out = kernels.decode.paged_decode_attention(
            q, layer_cache, tables, torch.tensor(lens), 0.125, num_splits=num_splits
        )
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_choose_num_splits_fills_the_gpu_within_bounds(kernels: Kernels) -> None:
    choose = kernels.decode.choose_num_splits
    assert choose(1, 8, 4096, 132) == 32  # one sequence: split as far as allowed
    assert choose(1, 8, 512, 132) == 4  # short context: splits stay >= 128 tokens
    assert choose(32, 8, 4096, 132) == 4
    assert choose(64, 8, 512, 132) == 2
    assert choose(128, 8, 4096, 132) == 1  # the batch alone fills the GPU
    assert choose(4, 8, 100, 132) == 1
    for batch in (1, 3, 8, 32, 64, 200):
        for context in (1, 100, 512, 4096, 32768):
            splits = choose(batch, 8, context, 132)
            assert 1 <= splits <= 32 and splits & (splits - 1) == 0


# --- prefill -----------------------------------------------------------------------------------


def _cu_seqlens(query_lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize(
    ("block_size", "num_q_heads", "num_kv_heads", "head_dim"),
    [(16, 8, 2, 64), (1, 4, 4, 80), (32, 4, 1, 32)],
)
def test_prefill_matches_the_reference(
    kernels: Kernels, block_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    """Fresh prompts, prompts over a prefix, one-token segments; 16x16 tiles, so a segment
    spans several query tiles and both key loops (unmasked and diagonal) run."""
    torch.manual_seed(block_size)
    query_lens = [37, 1, 16, 20, 5]
    lens = [37, 9, 16, 20 + 2 * block_size + 3, 5 + block_size]
    layer_cache = _cache(sum(lens) // block_size + 16, block_size, num_kv_heads, head_dim)
    tables = _fill(layer_cache, lens, garbage=-1)
    cu = _cu_seqlens(query_lens)
    q = _queries(int(cu[-1]), num_q_heads, num_kv_heads, head_dim)
    config = kernels.prefill.PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=2)
    out = kernels.prefill.paged_prefill_attention(
        q, layer_cache, tables, cu, torch.tensor(lens), 0.1, max_query_len=40, config=config
    )
    expected = paged_prefill(q, layer_cache, tables, cu, torch.tensor(lens), 0.1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_prefill_default_tiles_chunked_equals_whole(kernels: Kernels) -> None:
    """The default 128x64 tiles; two chunks of one prompt give the one-pass result."""
    layer_cache = _cache(12, 16, 2, 64)
    tables = _fill(layer_cache, [150], garbage=1 << 30)
    q = _queries(150, 4, 2, 64)
    attend = kernels.prefill.paged_prefill_attention

    def run(rows: slice, context_len: int) -> torch.Tensor:
        n = rows.stop - rows.start
        return attend(
            q[rows], layer_cache, tables, torch.tensor([0, n]), torch.tensor([context_len]),
            0.125, max_query_len=n,
        )  # fmt: skip

    whole = run(slice(0, 150), 150)
    chunks = torch.cat([run(slice(0, 70), 70), run(slice(70, 150), 150)])
    expected = paged_prefill(
        q, layer_cache, tables, torch.tensor([0, 150]), torch.tensor([150]), 0.125
    )
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunks, expected, rtol=1e-5, atol=1e-5)


def test_prefill_writes_every_output_row(kernels: Kernels) -> None:
    lens = [3, 40]
    layer_cache = _cache(8, 16, 2, 64)
    tables = _fill(layer_cache, lens, garbage=-1)
    cu = _cu_seqlens([3, 24])
    q = _queries(27, 4, 2, 64)
    out = torch.full((27, 4, 64), float("nan"))
    config = kernels.prefill.PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=2)
    kernels.prefill.paged_prefill_attention(
        q, layer_cache, tables, cu, torch.tensor(lens), 0.125, max_query_len=24, out=out,
        config=config,
    )  # fmt: skip
    expected = paged_prefill(q, layer_cache, tables, cu, torch.tensor(lens), 0.125)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# --- norms, activation, rope -------------------------------------------------------------------


def _llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in float32, round, multiply in the dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _assert_rounds_like(out: torch.Tensor, expected: torch.Tensor) -> None:
    """In a 16-bit dtype: bit-equal but for rare last-bit differences (float32 sums, exp and
    rsqrt in another order); rounding at another step, or not at all, would change a large
    share of the elements. In float32 there is no rounding step to check: a few ulps."""
    assert out.dtype == expected.dtype and out.shape == expected.shape
    eps = torch.finfo(out.dtype).eps
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=8 * eps, atol=8 * eps)
        return
    torch.testing.assert_close(out, expected, rtol=eps, atol=eps)
    assert (out == expected).float().mean() > 0.99


@pytest.mark.parametrize("hidden", [576, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_rounds_like_transformers(
    kernels: Kernels, hidden: int, dtype: torch.dtype
) -> None:
    x = (torch.randn(5, hidden + 64) * 3).to(dtype)[:, :hidden]  # strided rows
    weight = torch.randn(hidden).to(dtype)
    out = kernels.fused.rms_norm(x, weight, 1e-5)
    _assert_rounds_like(out, _llama_rms_norm(x, weight, 1e-5))
    three_d = kernels.fused.rms_norm(x.contiguous().view(5, 1, hidden), weight, 1e-5)
    torch.testing.assert_close(three_d.view(5, hidden), out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_add_rms_norm_updates_both_in_place(kernels: Kernels, dtype: torch.dtype) -> None:
    x = torch.randn(6, 576).to(dtype)
    residual = torch.randn(6, 576).to(dtype)
    weight = torch.randn(576).to(dtype)
    summed = x + residual
    x_out, residual_out = x.clone(), residual.clone()
    kernels.fused.fused_add_rms_norm(x_out, residual_out, weight, 1e-6)
    torch.testing.assert_close(residual_out, summed, rtol=0, atol=0)
    _assert_rounds_like(x_out, _llama_rms_norm(summed, weight, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul(kernels: Kernels, dtype: torch.dtype) -> None:
    intermediate = 1500  # not a multiple of the 1024-wide block
    x = torch.randn(4, 2 * intermediate).to(dtype)
    gate, up = x.float().chunk(2, dim=-1)
    out = kernels.fused.silu_and_mul(x)
    _assert_rounds_like(out, (F.silu(gate) * up).to(dtype))


def _cos_sin_cache(max_positions: int, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_positions).float(), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1) * 0.9  # an attention scaling


def _rotate_half_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' convention, in float32, rounded once: [T, H, D] with cos/sin [T, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    c, s = cos[:, None], sin[:, None]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "block_size", "dtype"),
    [(8, 2, 64, 16, torch.float32), (4, 4, 80, 1, torch.float16), (6, 2, 32, 8, torch.float32)],
)
def test_rope_and_write_kv(
    kernels: Kernels,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
) -> None:
    tokens = 7
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(tokens, width + 16).to(dtype)[:, :width]  # strided rows
    original = qkv.clone()
    positions = torch.tensor([0, 5, 6, 7, 100, 3, 1])
    slots = torch.tensor([3, -1, 17, 18, 0, 40, -1])  # -1: padding, written nowhere
    num_blocks = -(-64 // block_size)
    whole = torch.randn(num_blocks, 2, block_size, 2, num_kv_heads, head_dim).to(dtype)
    layer_cache = whole[:, 1]
    before = layer_cache.clone()
    cos_sin = _cos_sin_cache(128, head_dim)
    kernels.rope.rope_and_write_kv(
        qkv, positions, cos_sin, layer_cache, slots,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
    )  # fmt: skip

    cos, sin = cos_sin[positions].chunk(2, dim=-1)
    q, k, v = original.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )
    q_rot = _rotate_half_reference(q.view(tokens, num_heads, head_dim), cos, sin)
    k_rot = _rotate_half_reference(k.view(tokens, num_kv_heads, head_dim), cos, sin)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    q_end, k_end = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    torch.testing.assert_close(qkv[:, :q_end].view_as(q_rot), q_rot, **tol)
    torch.testing.assert_close(qkv[:, q_end:k_end].view_as(k_rot), k_rot, **tol)
    torch.testing.assert_close(qkv[:, k_end:], v, rtol=0, atol=0)

    expected = before.clone()
    bs = layer_cache.shape[1]
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[slot // bs, slot % bs, 0] = k_rot[t]
            expected[slot // bs, slot % bs, 1] = v[t].view(num_kv_heads, head_dim)
    torch.testing.assert_close(layer_cache, expected, **tol)
