"""The source side of `kvmesh.bench.transfer`, run as a process of its own.

    python -m kvmesh.bench._transfer_peer --name N --shape smollm2 --device cpu --num-blocks 128

It fills every block with `fill_blocks`' pattern, prints its `KvRegion` as one JSON line
(`{"region": {...}}`, metadata in base64) and serves READs until its stdin closes. Other lines on
stdout (UCX's own logs) are never JSON objects. Also home of what both sides share: model
shapes and the pattern.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from typing import Any

import click
import torch

from kvmesh.kv.cache import KvLayout, PagedKvCache, kv_dtype
from kvmesh.kv.quant import quantize_blocks
from kvmesh.kv.transfer.agent import KvTransferAgent
from kvmesh.kv.transfer.types import KvRegion
from kvmesh.telemetry import configure_logging

BLOCK_SIZE = 16
_PATTERN_PERIOD = 251  # a prime below 256: every value is exact in bf16 and float32


@dataclass(frozen=True, slots=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int


SHAPES = {
    "smollm2": ModelShape(num_layers=30, num_kv_heads=3, head_dim=64),  # SmolLM2-135M
    "llama8b": ModelShape(num_layers=32, num_kv_heads=8, head_dim=128),  # Llama-3.1-8B
}


def layout_for(shape: str, device: torch.device, dtype: str | None = None) -> KvLayout:
    """The KV layout of a model shape: float32 on the CPU, bfloat16 on a GPU, as served (or
    `dtype`, a KV dtype name such as `fp8_e4m3`)."""
    model = SHAPES[shape]
    served = torch.float32 if device.type == "cpu" else torch.bfloat16
    chosen = served if dtype is None else kv_dtype(dtype)
    return KvLayout(model.num_layers, model.num_kv_heads, model.head_dim, BLOCK_SIZE, chosen)


def expected_values(layout: KvLayout, device: torch.device, block_id: int) -> torch.Tensor:
    """The pattern of block `block_id` in float32: every block differs, every element too."""
    numel = math.prod(layout.block_shape)
    offset = (7 * block_id) % _PATTERN_PERIOD
    values = (torch.arange(numel, device=device) + offset) % _PATTERN_PERIOD
    return values.float().view(layout.block_shape)


def expected_block(cache: PagedKvCache, block_id: int) -> torch.Tensor:
    """What `fill_blocks` writes into block `block_id` of a 16- or 32-bit cache."""
    return expected_values(cache.layout, cache.device, block_id).to(cache.layout.dtype)


def fill_blocks(cache: PagedKvCache) -> None:
    for block_id in range(cache.num_blocks):
        values = expected_values(cache.layout, cache.device, block_id)
        if cache.scales is not None:
            cache.data[block_id], cache.scales[block_id] = (
                t[0] for t in quantize_blocks(values[None])
            )
        else:
            cache.tensor[block_id] = values.to(cache.layout.dtype)


def region_to_json(region: KvRegion) -> dict[str, Any]:
    fields = dataclasses.asdict(region)
    fields["metadata"] = base64.b64encode(region.metadata).decode()
    return fields


def region_from_json(fields: dict[str, Any]) -> KvRegion:
    return KvRegion(**{**fields, "metadata": base64.b64decode(fields["metadata"])})


async def serve_blocks(
    name: str, shape: str, device: torch.device, num_blocks: int, dtype: str | None
) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cache = PagedKvCache(layout_for(shape, device, dtype), num_blocks, device)
    fill_blocks(cache)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # readers' copies run on NIXL's streams, not ours
    with KvTransferAgent(name, cache) as agent:
        print(json.dumps({"region": region_to_json(agent.region())}), flush=True)
        serving = asyncio.create_task(agent.serve())
        # The reader closes our stdin when it is done (or dies).
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving


@click.command()
@click.option("--name", required=True)
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default="smollm2")
@click.option("--device", default="cpu")
@click.option("--num-blocks", type=int, required=True)
@click.option("--dtype", default=None, help="a KV dtype [default: as served on the device]")
def main(name: str, shape: str, device: str, num_blocks: int, dtype: str | None) -> None:
    configure_logging("WARNING")
    asyncio.run(serve_blocks(name, shape, torch.device(device), num_blocks, dtype))


if __name__ == "__main__":
    main()
