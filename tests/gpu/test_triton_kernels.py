"""The Triton kernels compiled for the GPU, in bf16, against float32 references.

Tolerance: a bf16 kernel and a float32 reference differ by bf16 rounding of the inputs' products
and of the output (about 2^-9 relative per value), so attention is judged by the relative
Frobenius error ||out - ref|| / ||ref||, expected around 1e-3..1e-2 and required below 2e-2.
The row-wise ops (norms, SiLU-and-mul, rotary) round exactly like their references, so they
must be bit-equal but for rare last-bit differences. The same checks run on CPU under the
Triton interpreter in tests/unit/engine/test_triton_kernels.py (float32, float16).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvmesh.engine.attention.paged import paged_decode, paged_prefill
from kvmesh.engine.kernels import (
    DecodeConfig,
    PrefillConfig,
    choose_num_splits,
    decode_workspace,
    fused_add_rms_norm,
    paged_decode_attention,
    paged_prefill_attention,
    rms_norm,
    rope_and_write_kv,
    silu_and_mul,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA; run on a GPU machine with pytest -m gpu"
)

_CUDA = "cuda"
_BF16 = torch.bfloat16
_MAX_ERROR = 2e-2


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference.double()).norm() / reference.double().norm())


def _paged_context(
    lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    garbage: int = -1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 1 of a two-layer bf16 cache and int32 block tables for `lens`. Slots outside the
    contexts hold NaN, and unused table entries `garbage`: reading either would show."""
    generator = torch.Generator(device=_CUDA).manual_seed(seed)
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 8
    shape = (num_blocks, 2, block_size, 2, num_kv_heads, head_dim)
    layer_cache = torch.full(shape, float("nan"), dtype=_BF16, device=_CUDA)[:, 1]
    ids = torch.randperm(num_blocks, device=_CUDA, generator=generator)
    tables = torch.full((len(lens), max(needed + [1]) + 1), garbage, dtype=torch.int32)
    taken = 0
    for row, (n, count) in enumerate(zip(lens, needed, strict=True)):
        blocks = ids[taken : taken + count]
        taken += count
        tables[row, :count] = blocks.cpu().to(torch.int32)
        values = torch.randn((count, *layer_cache.shape[1:]), device=_CUDA, generator=generator).to(
            _BF16
        )
        values.view(count * block_size, *layer_cache.shape[2:])[n:] = float("nan")
        layer_cache[blocks] = values
    return layer_cache, tables.to(_CUDA)


def _queries(rows: int, num_q_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """A strided view into a fused qkv buffer, as the model produces q."""
    qkv = torch.randn(rows, (num_q_heads + 2 * num_kv_heads) * head_dim, device=_CUDA)
    return qkv.to(_BF16)[:, : num_q_heads * head_dim].view(rows, num_q_heads, head_dim)


def _decode_reference(
    q: torch.Tensor, layer_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor
) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    return paged_decode(q.float(), layer_cache.float(), tables, lens, scale)


# --- decode ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block_size", "num_q_heads", "num_kv_heads", "head_dim", "num_splits"),
    [
        (16, 32, 8, 128, 1),
        (16, 32, 8, 128, 8),
        (1, 8, 8, 64, 4),  # MHA, block size 1
        (32, 8, 2, 80, 3),  # head_dim not a power of two
        (8, 16, 1, 64, 16),  # MQA, most splits empty for the short rows
    ],
)
def test_decode(
    block_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int, num_splits: int
) -> None:
    bs = block_size
    lens = [bs - 1, bs, bs + 1, 0, 3 * bs + 5, 700, 1]
    lens = [n for n in lens if n >= 0]
    layer_cache, tables = _paged_context(lens, bs, num_kv_heads, head_dim, garbage=1 << 30)
    q = _queries(len(lens), num_q_heads, num_kv_heads, head_dim)
    context_lens = torch.tensor(lens, device=_CUDA)
    out = paged_decode_attention(
        q, layer_cache, tables, context_lens, head_dim**-0.5, num_splits=num_splits
    )
    expected = _decode_reference(q, layer_cache, tables, context_lens)
    assert out.dtype == _BF16 and not out.isnan().any()
    assert _relative_error(out, expected) < _MAX_ERROR
    assert (out[lens.index(0)] == 0).all()


@pytest.mark.parametrize(
    "config",
    [
        None,
        DecodeConfig(block_n=32, num_warps=4, num_stages=2),
        DecodeConfig(block_n=64, num_warps=4, num_stages=3),
        DecodeConfig(block_n=128, num_warps=8, num_stages=2),
    ],
)
def test_decode_llama_8b_ragged_batch_overwrites_poisoned_buffers(
    config: DecodeConfig | None,
) -> None:
    generator = torch.Generator().manual_seed(7)
    lens = torch.randint(1, 4097, (32,), generator=generator).tolist()
    layer_cache, tables = _paged_context(lens, 16, 8, 128)
    q = _queries(32, 32, 8, 128)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=_CUDA)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = choose_num_splits(32, 8, 4096, num_sms)
    workspace = decode_workspace(32, 32, 128, splits, _CUDA)
    workspace.partial_out.fill_(float("nan"))
    workspace.partial_lse.fill_(float("nan"))
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(
        q, layer_cache, tables, context_lens, 128**-0.5,
        num_splits=splits, out=out, workspace=workspace, config=config,
    )  # fmt: skip
    assert not out.isnan().any()
    assert _relative_error(out, _decode_reference(q, layer_cache, tables, context_lens)) < 2e-2


def test_decode_replays_from_a_cuda_graph() -> None:
    """Captured once with fixed buffers; replayed after the lengths and tables change in place,
    padded rows (context 0) included."""
    max_batch = 8
    lens_a = [100, 1, 640, 17, 0, 0, 0, 0]
    lens_b = [5, 300, 0, 33, 64, 1, 0, 0]
    layer_cache, all_tables = _paged_context(lens_a + lens_b, 16, 8, 128)
    tables = torch.empty((max_batch, all_tables.shape[1]), dtype=torch.int32, device=_CUDA)
    context_lens = torch.zeros(max_batch, dtype=torch.int32, device=_CUDA)
    q = _queries(max_batch, 32, 8, 128)
    out = torch.empty_like(q)
    workspace = decode_workspace(max_batch, 32, 128, 8, _CUDA)

    def step() -> None:
        paged_decode_attention(
            q, layer_cache, tables, context_lens, 128**-0.5,
            num_splits=8, out=out, workspace=workspace,
        )  # fmt: skip

    def load(rows: slice, lens: list[int]) -> None:
        tables.copy_(all_tables[rows])
        context_lens.copy_(torch.tensor(lens))

    load(slice(0, 8), lens_a)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for rows, lens in ((slice(0, 8), lens_a), (slice(8, 16), lens_b)):
        load(rows, lens)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert not out.isnan().any()
        for row, n in enumerate(lens):
            if n == 0:
                assert (out[row] == 0).all()
        expected = _decode_reference(q, layer_cache, tables, context_lens)
        assert _relative_error(out, expected) < _MAX_ERROR


# --- prefill -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query_lens", "lens", "block_size", "num_q_heads", "num_kv_heads", "head_dim"),
    [
        ([2048], [2048], 16, 32, 8, 128),  # Llama 8B, fresh prompt
        ([512], [2048], 16, 32, 8, 128),  # Llama 8B, 512 queries over a 1536-token prefix
        ([37, 1, 200, 129, 64], [37, 900, 200, 1000, 64], 16, 32, 8, 128),
        ([77, 5, 300], [77, 100, 333], 1, 8, 8, 64),
        ([130, 17], [500, 17], 32, 8, 2, 80),
    ],
)
def test_prefill(
    query_lens: list[int],
    lens: list[int],
    block_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    layer_cache, tables = _paged_context(lens, block_size, num_kv_heads, head_dim)
    cu_list = [0]
    for n in query_lens:
        cu_list.append(cu_list[-1] + n)
    cu = torch.tensor(cu_list, dtype=torch.int32, device=_CUDA)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=_CUDA)
    q = _queries(cu_list[-1], num_q_heads, num_kv_heads, head_dim)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(
        q, layer_cache, tables, cu, context_lens, scale, max_query_len=max(query_lens), out=out
    )
    expected = paged_prefill(q.float(), layer_cache.float(), tables, cu, context_lens, scale)
    assert not out.isnan().any()
    assert _relative_error(out, expected) < _MAX_ERROR


def test_prefill_small_tiles_and_chunks() -> None:
    layer_cache, tables = _paged_context([1000], 16, 8, 128)
    q = _queries(1000, 32, 8, 128)
    config = PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)

    def attend(rows: slice, context_len: int) -> torch.Tensor:
        n = rows.stop - rows.start
        cu = torch.tensor([0, n], device=_CUDA)
        lens = torch.tensor([context_len], device=_CUDA)
        return paged_prefill_attention(
            q[rows], layer_cache, tables, cu, lens, 128**-0.5, max_query_len=n, config=config
        )

    chunked = torch.cat([attend(slice(0, 384), 384), attend(slice(384, 1000), 1000)])
    cu = torch.tensor([0, 1000], device=_CUDA)
    lens = torch.tensor([1000], device=_CUDA)
    expected = paged_prefill(q.float(), layer_cache.float(), tables, cu, lens, 128**-0.5)
    assert _relative_error(chunked, expected) < _MAX_ERROR


# --- norms, activation, rope -------------------------------------------------------------------


def _assert_rounds_like(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-equal but for rare last-bit differences (float32 sums and rsqrt in another order)."""
    assert out.dtype == expected.dtype and out.shape == expected.shape
    eps = torch.finfo(out.dtype).eps
    torch.testing.assert_close(out, expected, rtol=eps, atol=eps)
    assert (out == expected).float().mean() > 0.99


def _llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


@pytest.mark.parametrize("hidden", [576, 4096])
def test_rms_norm_rounds_like_transformers(hidden: int) -> None:
    x = (torch.randn(300, hidden + 64, device=_CUDA) * 3).to(_BF16)[:, :hidden]
    weight = torch.randn(hidden, device=_CUDA).to(_BF16)
    out = torch.full((300, hidden), float("nan"), dtype=_BF16, device=_CUDA)
    rms_norm(x, weight, 1e-5, out=out)
    _assert_rounds_like(out, _llama_rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("hidden", [576, 4096])
def test_fused_add_rms_norm_rounds_like_transformers(hidden: int) -> None:
    x = torch.randn(300, hidden, device=_CUDA).to(_BF16)
    residual = torch.randn(300, hidden, device=_CUDA).to(_BF16)
    weight = torch.randn(hidden, device=_CUDA).to(_BF16)
    summed = x + residual
    fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(residual, summed)
    _assert_rounds_like(x, _llama_rms_norm(summed, weight, 1e-6))


def test_silu_and_mul_rounds_once() -> None:
    x = torch.randn(300, 2 * 14336, device=_CUDA).to(_BF16)
    gate, up = x.float().chunk(2, dim=-1)
    out = torch.full((300, 14336), float("nan"), dtype=_BF16, device=_CUDA)
    silu_and_mul(x, out=out)
    _assert_rounds_like(out, (F.silu(gate) * up).to(_BF16))


def test_rope_and_write_kv_llama_8b() -> None:
    tokens, num_heads, num_kv_heads, head_dim, block_size = 300, 32, 8, 128, 16
    q_end, k_end = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    qkv = torch.randn(tokens, k_end + num_kv_heads * head_dim, device=_CUDA).to(_BF16)
    original = qkv.clone()
    positions = torch.randint(0, 8192, (tokens,), device=_CUDA)
    slots = torch.randperm(64 * block_size, device=_CUDA)[:tokens]
    slots[::7] = -1  # padding: written nowhere
    layer_cache = torch.zeros(64, 2, block_size, 2, num_kv_heads, head_dim, dtype=_BF16)
    layer_cache = layer_cache.to(_CUDA)[:, 1]
    before = layer_cache.clone()
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, device=_CUDA) / head_dim))
    angles = torch.outer(torch.arange(8192, device=_CUDA).float(), inv_freq)
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)

    rope_and_write_kv(
        qkv, positions, cos_sin, layer_cache, slots,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
    )  # fmt: skip

    cos, sin = (t[:, None] for t in cos_sin[positions].chunk(2, dim=-1))
    heads = original[:, :k_end].view(tokens, -1, head_dim).float()
    x1, x2 = heads[..., : head_dim // 2], heads[..., head_dim // 2 :]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(_BF16)
    _assert_rounds_like(qkv[:, :k_end].view_as(rotated), rotated)
    assert torch.equal(qkv[:, k_end:], original[:, k_end:])
    expected = before.clone()
    keep = slots >= 0
    kv = torch.stack([qkv[:, q_end:k_end], qkv[:, k_end:]], dim=1)
    expected[slots[keep] // block_size, slots[keep] % block_size] = kv[keep].view(
        -1, 2, num_kv_heads, head_dim
    )
    assert torch.equal(layer_cache, expected)
