"""FP8 KV with per-block scales: whole blocks, and blocks filled a token at a time."""

from __future__ import annotations

import torch

from kvmesh.kv import quant
from kvmesh.kv.cache import KvLayout, PagedKvCache

LAYOUT = KvLayout(2, 2, 8, 4, torch.float8_e4m3fn)


def test_whole_blocks_round_trip_within_e4m3_precision() -> None:
    values = torch.randn((3, 2, 4, 2, 2, 8), generator=torch.Generator().manual_seed(0)) * 50
    data, scales = quant.quantize_blocks(values)
    assert data.dtype == torch.float8_e4m3fn and scales.shape == (3, 2, 2, 2)
    back = data.float() * scales[:, :, None, :, :, None]
    assert torch.allclose(back, values, rtol=0.07, atol=1e-6 + 0.07 * values.abs().max().item())
    # Each (block, layer, K/V, head) uses its range: its largest value maps to e4m3's largest.
    assert torch.allclose(data.float().abs().amax(dim=(2, 5)), torch.full_like(scales, 448.0))


def test_a_zero_block_stays_zero() -> None:
    data, scales = quant.quantize_blocks(torch.zeros((1, 2, 4, 2, 2, 8)))
    assert not data.float().any() and (scales > 0).all()


def test_token_writes_grow_a_block_scale_and_requantize_what_it_holds() -> None:
    cache = PagedKvCache(LAYOUT, 4, torch.device("cpu"))
    assert cache.scales is not None
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn((4, 2, 2, 2, 8), generator=generator)
    tokens[3] *= 100  # the last token needs a scale 100 times the first's
    for t in range(4):  # one token at a time, as decode writes them
        quant.write_tokens(
            cache.data, cache.scales, torch.tensor([2]), torch.tensor([t]), tokens[t : t + 1]
        )
    got = cache.read_values([2])[0].transpose(0, 1)  # [tokens, L, 2, H, D]
    big = tokens[3].abs().max().item()
    assert torch.allclose(got[3], tokens[3], rtol=0.07, atol=0.07 * big)
    # Small tokens lose precision to the grown scale but stay within e4m3's grid of it.
    assert torch.allclose(got[:3], tokens[:3], atol=big / 448 * 8)
    assert not cache.data[[0, 1, 3]].float().any()  # other blocks untouched


def test_a_write_from_offset_zero_starts_the_block_afresh() -> None:
    cache = PagedKvCache(LAYOUT, 2, torch.device("cpu"))
    assert cache.scales is not None
    big = torch.full((1, 2, 2, 2, 8), 1000.0)
    quant.write_tokens(cache.data, cache.scales, torch.tensor([1]), torch.tensor([0]), big)
    small = torch.full((1, 2, 2, 2, 8), 0.5)
    quant.write_tokens(cache.data, cache.scales, torch.tensor([1]), torch.tensor([0]), small)
    assert torch.allclose(cache.read_values([1])[0, :, 0], small[0])  # not 0.5 in 1000's grid
