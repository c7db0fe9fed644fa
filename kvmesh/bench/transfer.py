"""NIXL READ throughput of a prompt's KV between two processes, next to a plain copy.

The source cache lives in a child process (`kvmesh.bench._transfer_peer`, on `peer_device`), the
reading cache here (on `device`), so every byte crosses a process boundary as it does between a
prefill and a decode worker. One READ moves the KV of `num_tokens` tokens of a model shape,
block by block through `KvTransferAgent.read_blocks`; the reference is one plain memcpy of the
same bytes in this process (libc's on the CPU, cudaMemcpy on a GPU; torch's multi-threaded CPU
copy is reported beside it) and, on two GPUs, torch's device-to-device copy between them.
"scattered" reads land in shuffled local blocks (no two neighbours, so no descriptors merge),
"contiguous" ones in order (NIXL merges them into one large copy). Times are the best
of `repeats` after a warm-up; GB/s are 10^9 bytes per second.

With `--transfer-dtype fp8_e4m3` the same run also moves the blocks as a prefill worker with
that option sends them (FP8 with per-block scales, about half the bytes of bf16): the bare READ
of the FP8 blocks, and the READ plus the conversion into the reader's own cache
(`KvTransferAgent.read_converted`), side by side with the native READ.

    python -m kvmesh.bench.transfer --num-tokens 2048 --shape smollm2 --device cpu
    python -m kvmesh.bench.transfer --shape llama8b --device cuda:0 --peer-device cuda:1
    python -m kvmesh.bench.transfer --shape llama8b --device cuda:0 --transfer-dtype fp8_e4m3
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import click
import torch

from kvmesh.bench._transfer_peer import (
    SHAPES,
    expected_block,
    expected_values,
    layout_for,
    region_from_json,
)
from kvmesh.kv.cache import PagedKvCache
from kvmesh.kv.transfer.agent import KvTransferAgent
from kvmesh.kv.transfer.types import KvRegion
from kvmesh.telemetry import configure_logging

_PEER_START_TIMEOUT_S = 120.0
_READ_TIMEOUT_S = 60.0


async def run_transfer_benchmark(
    *,
    num_tokens: int,
    shape: str,
    device: str,
    peer_device: str | None,
    repeats: int,
    transfer_dtype: str | None = None,
) -> dict[str, Any]:
    """Measure one READ of `num_tokens` tokens' KV from a child process; a JSON-ready report."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
    here, there = torch.device(device), torch.device(peer_device or device)
    if here.type != there.type:
        raise ValueError("the reader and the source must both be on the CPU or both on GPUs")
    if here.type == "cuda":
        torch.cuda.set_device(here)
    layout = layout_for(shape, here)
    num_blocks = math.ceil(num_tokens / layout.block_size)
    num_bytes = num_blocks * layout.bytes_per_block

    peer = await _start_peer(shape, str(there), num_blocks)
    try:
        region = await _region_of(peer)
        cache = PagedKvCache(layout, num_blocks, here)
        with KvTransferAgent(f"bench-reader-{os.getpid()}", cache) as agent:
            agent.add_peer(region)
            nixl = await _time_reads(agent, region, repeats)
    finally:
        await _stop(peer)

    src = torch.ones(num_bytes, dtype=torch.uint8, device=here)
    dst = torch.zeros_like(src)
    # The reference: one plain memcpy of the same bytes (libc's on the CPU, one thread, as the
    # READ is; cudaMemcpy on a GPU), and torch's copy, which spreads a CPU copy over threads.
    torch_copy_s = _best_seconds(lambda: dst.copy_(src), repeats, here)
    copy_s = torch_copy_s
    if here.type == "cpu":
        copy_s = _best_seconds(
            lambda: ctypes.memmove(dst.data_ptr(), src.data_ptr(), num_bytes), repeats, here
        )
    peer_copy_s = None
    if here.type == "cuda" and here != there:
        remote = torch.ones(num_bytes, dtype=torch.uint8, device=there)
        peer_copy_s = _best_seconds(lambda: dst.copy_(remote), repeats, here, there)
    report: dict[str, Any] = {
        "shape": shape,
        "num_tokens": num_tokens,
        "num_blocks": num_blocks,
        "block_size": layout.block_size,
        "dtype": str(layout.dtype).removeprefix("torch."),
        "bytes": num_bytes,
        "bytes_per_block": layout.bytes_per_block,
        "device": str(here),
        "peer_device": str(there),
        "memory_type": region.memory_type,
        "repeats": repeats,
        "nixl_read_seconds": nixl["scattered"],
        "nixl_read_gbps": _gbps(num_bytes, nixl["scattered"]),
        "nixl_read_contiguous_gbps": _gbps(num_bytes, nixl["contiguous"]),
        "memcpy_gbps": _gbps(num_bytes, copy_s),
        "torch_copy_gbps": _gbps(num_bytes, torch_copy_s),
        "ratio_nixl_to_memcpy": round(copy_s / nixl["scattered"], 3),
        "ratio_nixl_contiguous_to_memcpy": round(copy_s / nixl["contiguous"], 3),
        "verified": True,
    }
    if peer_copy_s is not None:
        report["device_to_device_copy_gbps"] = _gbps(num_bytes, peer_copy_s)
        report["ratio_nixl_to_device_to_device_copy"] = round(peer_copy_s / nixl["scattered"], 3)
    if transfer_dtype is not None:
        sent = await _time_sent_in(transfer_dtype, shape, here, there, num_blocks, repeats)
        sent["ratio_bytes_to_native"] = round(sent["bytes"] / num_bytes, 4)
        sent["ratio_read_seconds_to_native"] = round(sent["read_seconds"] / nixl["scattered"], 3)
        sent["ratio_read_and_convert_seconds_to_native"] = round(
            sent["read_and_convert_seconds"] / nixl["scattered"], 3
        )
        report["transfer_dtype"] = sent
    return report


async def _time_sent_in(
    dtype: str,
    shape: str,
    here: torch.device,
    there: torch.device,
    num_blocks: int,
    repeats: int,
) -> dict[str, Any]:
    """The blocks served in `dtype`: best seconds of the bare READ (into a cache of that
    layout) and of the READ plus the conversion into the native layout; both scattered."""
    sent = layout_for(shape, there, dtype)
    native = layout_for(shape, here)
    peer = await _start_peer(shape, str(there), num_blocks, dtype)
    try:
        region = await _region_of(peer)
        shuffled = random.Random(0).sample(range(num_blocks), num_blocks)
        remote = list(range(num_blocks))
        same = PagedKvCache(sent, num_blocks, here)
        with KvTransferAgent(f"bench-raw-{os.getpid()}", same) as agent:
            agent.add_peer(region)
            await agent.read_blocks(region.agent_name, remote, shuffled, notify=b"warm-up")
            read_s = min(
                [
                    (await agent.read_blocks(region.agent_name, remote, shuffled)).seconds
                    for _ in range(repeats)
                ]
            )
        cache = PagedKvCache(native, num_blocks, here)
        staging = num_blocks * sent.bytes_per_block
        with KvTransferAgent(f"bench-convert-{os.getpid()}", cache, staging_bytes=staging) as agent:
            agent.add_peer(region)
            num_tokens = num_blocks * native.block_size

            async def read() -> float:
                started = time.perf_counter()
                await agent.read_converted(
                    region.agent_name, remote, shuffled, skip=0, num_tokens=num_tokens
                )
                return time.perf_counter() - started

            await read()
            error = _conversion_error(cache, shuffled, remote)
            convert_s = min([await read() for _ in range(repeats)])
    finally:
        await _stop(peer)
    return {
        "dtype": dtype,
        "bytes": num_blocks * sent.bytes_per_block,
        "bytes_per_block": sent.bytes_per_block,
        "read_seconds": read_s,
        "read_gbps": _gbps(num_blocks * sent.bytes_per_block, read_s),
        "read_and_convert_seconds": convert_s,
        "max_relative_error": error,
    }


def _conversion_error(cache: PagedKvCache, local: list[int], remote: list[int]) -> float:
    """The largest error of the converted blocks against the pattern, relative to its range."""
    worst = 0.0
    for local_id, remote_id in zip(local, remote, strict=True):
        want = expected_values(cache.layout, cache.device, remote_id)
        got = cache.read_values([local_id])[0]
        worst = max(worst, float((got - want).abs().max()) / 250.0)
    return round(worst, 5)


def run(
    num_tokens: int = 2048,
    shape: str = "smollm2",
    device: str = "cpu",
    peer_device: str | None = None,
    repeats: int = 10,
    transfer_dtype: str | None = None,
) -> dict[str, Any]:
    return asyncio.run(
        run_transfer_benchmark(
            num_tokens=num_tokens,
            shape=shape,
            device=device,
            peer_device=peer_device,
            repeats=repeats,
            transfer_dtype=transfer_dtype,
        )
    )


async def _time_reads(agent: KvTransferAgent, region: KvRegion, repeats: int) -> dict[str, float]:
    """Best READ seconds with local blocks shuffled (no two neighbours merge) and in order."""
    num_blocks = region.num_blocks
    remote = list(range(num_blocks))
    shuffled = random.Random(0).sample(remote, num_blocks)
    best: dict[str, float] = {}
    for label, local in (("scattered", shuffled), ("contiguous", remote)):
        agent.kv_cache.tensor.zero_()
        _synchronize(agent.kv_cache.device)  # NIXL copies on its own streams, not torch's
        await agent.read_blocks(region.agent_name, remote, local, notify=b"warm-up")
        _check_blocks(agent.kv_cache, local, remote)
        seconds = []
        for i in range(repeats):
            result = await agent.read_blocks(
                region.agent_name, remote, local, notify=b"%d" % i, timeout_s=_READ_TIMEOUT_S
            )
            seconds.append(result.seconds)
        best[label] = min(seconds)
    return best


def _check_blocks(cache: PagedKvCache, local: list[int], remote: list[int]) -> None:
    for local_id, remote_id in zip(local, remote, strict=True):
        if not torch.equal(cache.tensor[local_id], expected_block(cache, remote_id)):
            raise AssertionError(f"block {remote_id} arrived wrong in local block {local_id}")


def _best_seconds(copy: Callable[[], object], repeats: int, *devices: torch.device) -> float:
    copy()
    _synchronize(*devices)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        copy()
        _synchronize(*devices)
        best = min(best, time.perf_counter() - started)
    return best


def _synchronize(*devices: torch.device) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _gbps(num_bytes: int, seconds: float) -> float:
    return round(num_bytes / seconds / 1e9, 3)


async def _start_peer(
    shape: str, device: str, num_blocks: int, dtype: str | None = None
) -> asyncio.subprocess.Process:
    extra = [] if dtype is None else ["--dtype", dtype]
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kvmesh.bench._transfer_peer",
        "--name",
        f"bench-source-{os.getpid()}",
        "--shape",
        shape,
        "--device",
        device,
        "--num-blocks",
        str(num_blocks),
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def _region_of(peer: asyncio.subprocess.Process) -> KvRegion:
    stdout = peer.stdout
    assert stdout is not None

    async def first_region() -> KvRegion:
        while line := await stdout.readline():
            if line.startswith(b"{") and "region" in (message := json.loads(line)):
                return region_from_json(message["region"])
        raise RuntimeError(f"the source process exited ({await peer.wait()}) before serving")

    return await asyncio.wait_for(first_region(), _PEER_START_TIMEOUT_S)


async def _stop(peer: asyncio.subprocess.Process) -> None:
    if peer.stdin is not None:
        peer.stdin.close()
    try:
        await asyncio.wait_for(peer.wait(), 30)
    except asyncio.TimeoutError:
        peer.kill()
        await peer.wait()


@click.command()
@click.option("--num-tokens", type=int, default=2048, show_default=True)
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default="smollm2", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N (the reader)")
@click.option("--peer-device", default=None, help="the source's device [default: --device]")
@click.option("--repeats", type=int, default=10, show_default=True)
@click.option(
    "--transfer-dtype",
    type=click.Choice(["fp8_e4m3", "bfloat16", "float16", "float32"]),
    default=None,
    help="also move the blocks in this dtype, as a prefill worker with the option sends them",
)
def main(
    num_tokens: int,
    shape: str,
    device: str,
    peer_device: str | None,
    repeats: int,
    transfer_dtype: str | None,
) -> None:
    configure_logging("WARNING")
    report = run(num_tokens, shape, device, peer_device, repeats, transfer_dtype)
    click.echo(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
