"""NIXL READs over UCX from a real second process: exact bytes, notification, a killed peer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from kvmesh.kv.cache import PagedKvCache
from kvmesh.kv.errors import TransferError
from kvmesh.kv.transfer.agent import KvTransferAgent
from kvmesh.kv.transfer.types import KvRegion
from tests.integration.kv.transfer_peer import LAYOUT, block_pattern, region_from_json

REPO_ROOT = Path(__file__).resolve().parents[3]
NUM_BLOCKS = 16
STARTUP_TIMEOUT_S = 60.0  # torch + NIXL import in a fresh interpreter, on a slow CI machine


@dataclass(slots=True)
class Peer:
    process: asyncio.subprocess.Process
    region: KvRegion

    @property
    def name(self) -> str:
        return self.region.agent_name


async def _message(process: asyncio.subprocess.Process, key: str, timeout_s: float) -> Any:
    """The value under `key` of the next JSON object the peer prints, skipping log lines."""
    stdout = process.stdout
    assert stdout is not None

    async def find() -> Any:
        while line := await stdout.readline():
            if line.startswith(b"{") and key in (message := json.loads(line)):
                return message[key]
        raise AssertionError(f"peer exited ({await process.wait()}) before printing {key!r}")

    return await asyncio.wait_for(find(), timeout_s)


@pytest.fixture
async def start_peer() -> AsyncIterator[Callable[[str], Awaitable[Peer]]]:
    processes: list[asyncio.subprocess.Process] = []

    async def start(role: str) -> Peer:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.integration.kv.transfer_peer",
            "--name",
            f"{role}-{uuid.uuid4().hex[:8]}",
            "--num-blocks",
            str(NUM_BLOCKS),
            "--wait-s",
            "30",
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        processes.append(process)
        region = region_from_json(await _message(process, "region", STARTUP_TIMEOUT_S))
        return Peer(process, region)

    yield start
    for process in processes:
        if process.returncode is None:
            process.kill()
        await process.wait()


@pytest.fixture
def reader() -> Iterator[KvTransferAgent]:
    cache = PagedKvCache(LAYOUT, NUM_BLOCKS, torch.device("cpu"))
    with KvTransferAgent(f"decode-{uuid.uuid4().hex[:8]}", cache) as agent:
        yield agent


def _assert_blocks_hold(agent: KvTransferAgent, local: list[int], remote: list[int]) -> None:
    for local_id, remote_id in zip(local, remote, strict=True):
        got = agent.kv_cache.tensor[local_id].view(torch.uint8)
        assert torch.equal(got, block_pattern(remote_id).view(torch.uint8)), (local_id, remote_id)


async def test_reads_blocks_from_another_process_and_notifies_it(
    start_peer: Callable[[str], Awaitable[Peer]], reader: KvTransferAgent
) -> None:
    peer = await start_peer("prefill")
    reader.add_peer(peer.region)
    remote, local = [2, 11, 5, 15], [0, 9, 3, 14]

    result = await reader.read_blocks(peer.name, remote, local, notify=b"req-7", timeout_s=10)

    _assert_blocks_hold(reader, local, remote)
    assert result.num_bytes == len(remote) * LAYOUT.bytes_per_block
    assert await _message(peer.process, "notifications", 30) == [[reader.name, "req-7"]]
    assert await asyncio.wait_for(peer.process.wait(), 30) == 0


async def test_killed_peer_fails_within_the_timeout_and_the_agent_stays_usable(
    start_peer: Callable[[str], Awaitable[Peer]], reader: KvTransferAgent
) -> None:
    doomed, alive = await asyncio.gather(start_peer("doomed"), start_peer("alive"))
    reader.add_peer(doomed.region)
    reader.add_peer(alive.region)
    doomed.process.kill()
    await doomed.process.wait()

    started = time.monotonic()
    with pytest.raises(TransferError):
        await reader.read_blocks(doomed.name, [1, 2], [1, 2], notify=b"lost", timeout_s=3)
    assert time.monotonic() - started < 3 + 2
    assert reader.stats.failures == 1

    await reader.read_blocks(alive.name, [7, 4], [2, 1], notify=b"after", timeout_s=10)
    _assert_blocks_hold(reader, [2, 1], [7, 4])
    assert await _message(alive.process, "notifications", 30) == [[reader.name, "after"]]


async def test_stopped_peer_never_hangs_the_reader_or_its_event_loop(
    start_peer: Callable[[str], Awaitable[Peer]], reader: KvTransferAgent
) -> None:
    peer = await start_peer("stopped")
    reader.add_peer(peer.region)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    peer.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        # A stopped peer makes no progress, so over UCX loopback the READ times out (and is
        # cancelled); a transport that needs no peer progress may complete it instead.
        with contextlib.suppress(TransferError):
            await reader.read_blocks(peer.name, [3], [3], timeout_s=1)
        assert time.monotonic() - started < 1 + 2
    finally:
        peer.process.send_signal(signal.SIGCONT)
        ticker.cancel()
    assert ticks > 100

    await reader.read_blocks(peer.name, [6], [5], notify=b"resumed", timeout_s=10)
    _assert_blocks_hold(reader, [5], [6])
    assert await _message(peer.process, "notifications", 30) == [[reader.name, "resumed"]]
