"""A KV source in a process of its own: `python -m tests.integration.kv.transfer_peer --name P`.

It fills every block with `block_pattern(block_id)`, prints its `KvRegion` as one JSON line
(`{"region": {...}}`, metadata in base64), waits for NIXL notifications (a reader's READ
completing), prints them (`{"notifications": [[peer, message], ...]}`) and exits: 0 if any came,
1 if none came within `--wait-s`. Other lines on stdout (library logs) are not JSON objects.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import math
import sys
from typing import Any

import torch

from kvmesh.kv.cache import KvLayout, PagedKvCache
from kvmesh.kv.transfer.agent import KvTransferAgent
from kvmesh.kv.transfer.types import KvRegion
from kvmesh.telemetry import configure_logging

LAYOUT = KvLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)


def block_pattern(block_id: int) -> torch.Tensor:
    """Distinct, exactly representable values for each block and position."""
    numel = math.prod(LAYOUT.block_shape)
    values = torch.arange(numel, dtype=torch.float32) + 1000 * block_id
    return values.view(LAYOUT.block_shape)


def region_to_json(region: KvRegion) -> dict[str, Any]:
    fields = dataclasses.asdict(region)
    fields["metadata"] = base64.b64encode(region.metadata).decode()
    return fields


def region_from_json(fields: dict[str, Any]) -> KvRegion:
    return KvRegion(**{**fields, "metadata": base64.b64decode(fields["metadata"])})


def _say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


async def main(name: str, num_blocks: int, wait_s: float) -> int:
    cache = PagedKvCache(LAYOUT, num_blocks, torch.device("cpu"))
    for block_id in range(num_blocks):
        cache.tensor[block_id] = block_pattern(block_id)
    with KvTransferAgent(name, cache) as agent:
        _say({"region": region_to_json(agent.region())})
        received = await agent.wait_notifications(timeout_s=wait_s)
        _say({"notifications": [[peer, message.decode()] for peer, message in received]})
    return 0 if received else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--num-blocks", type=int, default=16)
    parser.add_argument("--wait-s", type=float, default=30.0)
    args = parser.parse_args()
    configure_logging("WARNING")
    sys.exit(asyncio.run(main(args.name, args.num_blocks, args.wait_s)))
