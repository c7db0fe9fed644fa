"""A network partition: a decode worker in its own network namespace (`ip netns`, a veth pair)
is cut off from the rest of the mesh, then healed.

While it is cut off the registry's health check fails, the router stops sending it requests and
they go to the other decode worker: none fails. When the link comes back it rejoins, serves
again, and its answers are the same greedy answers as before (nothing corrupted). Skips, saying
why, where network namespaces cannot be made (not root, no `ip`, a kernel without netns).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from kvmesh.api.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from kvmesh.process import Child, start_child, stop_child, wait_ready
from kvmesh.rpc import open_channel
from kvmesh.up import Mesh
from tests.e2e.mesh import SIM_MODEL, sim_mesh

HOST_IP, NS_IP = "10.213.7.1", "10.213.7.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def namespace() -> Iterator[tuple[str, str]]:
    """(namespace, host-side link): a veth pair between this host and a new namespace."""
    name, link = f"kvmesh-{uuid.uuid4().hex[:6]}", f"kvp{uuid.uuid4().hex[:6]}"
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("network namespaces need root and the `ip` tool (iproute2)")
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot make a network namespace here: {e.stderr.decode().strip()}")
    try:
        _ip("link", "add", link, "type", "veth", "peer", "name", f"{link}n")
        _ip("link", "set", f"{link}n", "netns", name)
        _ip("addr", "add", f"{HOST_IP}/30", "dev", link)
        _ip("link", "set", link, "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"{NS_IP}/30", "dev", f"{link}n")
        _ip("netns", "exec", name, "ip", "link", "set", f"{link}n", "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name, link
    finally:
        subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture(scope="module")
async def mesh(
    namespace: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    async with sim_mesh(
        tmp_path_factory.mktemp("partition") / "logs",
        speed=1,
        host=HOST_IP,  # every service on the host side of the link
        num_prefill=0,
        num_decode=1,
    ) as running:
        yield running


@pytest.fixture(scope="module")
async def cut_off_worker(
    mesh: Mesh, namespace: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Child]:
    """A second decode worker, inside the namespace."""
    argv = [
        "ip", "netns", "exec", namespace[0], sys.executable, "-m", "services.decode",
        "--registry", mesh.registry_address, "--model", SIM_MODEL, "--host", NS_IP,
        "--engine", "sim", "--engine-arg", "speed=1", "--metrics-port", "0",
    ]  # fmt: skip
    child = await start_child("decode-netns", argv, tmp_path_factory.mktemp("netns-logs"))
    try:
        await wait_ready(child, "decode serving", 120)
        yield child
    finally:
        await stop_child(child, 5)


def request(i: int) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        request_id=f"partition-{i}-{uuid.uuid4().hex[:6]}",
        token_ids=generation_pb2.TokenIds(ids=[100 + i + k for k in range(24)]),
        sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
        return_token_ids=True,
    )


async def generate(stub: generation_pb2_grpc.GenerationStub, i: int) -> list[int]:
    tokens: list[int] = []
    async for response in stub.Generate(request(i), timeout=60):
        tokens += response.token_ids
    return tokens


async def decode_workers(stub: generation_pb2_grpc.GenerationStub) -> int:
    models = await stub.ListModels(generation_pb2.ListModelsRequest(), timeout=5)
    return models.models[0].num_decode_workers


async def until(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)  # polling the router's view


async def test_a_cut_off_worker_is_routed_around_and_rejoins_intact(
    mesh: Mesh, namespace: tuple[str, str], cut_off_worker: Child
) -> None:
    link = namespace[1]
    async with open_channel(mesh.router_address, wait_for_ready=False) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)

        async def both() -> bool:
            return await decode_workers(stub) == 2

        async def one() -> bool:
            return await decode_workers(stub) == 1

        await until(both, 60, "the worker in the namespace never joined")
        reference = [await generate(stub, i) for i in range(8)]

        _ip("link", "set", link, "down")  # the partition
        try:
            await until(one, 30, "the router kept the cut-off worker")
            during = await asyncio.gather(*(generate(stub, i) for i in range(8)))
            assert during == reference  # served by the other worker, none failed
        finally:
            _ip("link", "set", link, "up")  # healed
        await until(both, 60, "the worker did not rejoin after the partition")
        after = await asyncio.gather(*(generate(stub, i % 8) for i in range(16)))
        assert after == reference + reference
    assert cut_off_worker.alive


async def test_requests_in_flight_across_the_cut_still_complete(
    mesh: Mesh, namespace: tuple[str, str], cut_off_worker: Child
) -> None:
    """Streams already on the worker when the link goes down wait for it to come back (TCP
    retransmits) or move on: either way each completes with the right answer."""
    link = namespace[1]
    async with open_channel(mesh.router_address, wait_for_ready=False) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        reference = [await generate(stub, 50 + i) for i in range(6)]
        running = [asyncio.create_task(generate(stub, 50 + i)) for i in range(6)]
        _ip("link", "set", link, "down")
        await asyncio.sleep(3)  # the partition lasts this long
        _ip("link", "set", link, "up")
        assert await asyncio.gather(*running) == reference
