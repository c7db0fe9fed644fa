"""Failures in the running mesh: a decode worker killed mid-stream, cancelled requests, leases."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from kvmesh.api.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.bench.prompts import CHAT_PROMPTS
from kvmesh.engine import EngineConfig
from kvmesh.engine.torch_engine import TorchCore
from kvmesh.sampling import SamplingParams
from kvmesh.up import Child, Mesh
from tests.e2e.mesh import children, grpc_channel, metric, running_mesh
from tests.helpers import generate

MODEL = "SmolLM2-135M-Instruct"
LEASE_S = 3.0


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(
        tmp_path, num_decode=2, worker_args=["--lease-s", str(LEASE_S), "--ttl-s", "1"]
    ) as running:
        yield running


async def busy_decode_worker(mesh: Mesh) -> Child:
    for _ in range(100):  # bounded
        for child in children(mesh, "decode"):
            if await metric(child, "kvmesh_engine_running_requests") > 0:
                return child
        await asyncio.sleep(0.02)  # polling the workers' metrics
    raise AssertionError("no decode worker is running the request")


async def sse_text(
    response: httpx.Response, on_chunk: Callable[[str], Awaitable[None]] | None = None
) -> str:
    text = ""
    async for line in response.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        assert "error" not in chunk, chunk
        for choice in chunk.get("choices", []):
            text += choice["delta"].get("content") or ""
        if on_chunk is not None:
            await on_chunk(text)
    return text


async def test_sigkill_of_the_decode_worker_mid_stream_migrates(mesh: Mesh) -> None:
    reference = TorchCore(EngineConfig(model="smollm2", device="cpu"), show_progress=False)
    tokenizer = reference.tokenizer
    assert tokenizer is not None
    question = "Write a long story about a dragon who learns to bake bread."
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}])
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    expected = tokenizer.decode(generate(reference, [prompt], params)[0])
    router = next(c for c in mesh.children if c.name == "router")
    migrations_before = await metric(router, "kvmesh_router_migrations_total")

    killed: list[str] = []

    async def kill_after_a_few_chunks(text_so_far: str) -> None:
        if not killed and len(text_so_far) > 20:
            victim = await busy_decode_worker(mesh)
            victim.process.kill()
            killed.append(victim.name)

    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 48,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    async with (
        httpx.AsyncClient(base_url=mesh.edge_url, timeout=120) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        text = await sse_text(response, kill_after_a_few_chunks)
    assert killed, "the stream finished before a decode worker could be killed"
    assert text == expected
    assert await metric(router, "kvmesh_router_migrations_total") == migrations_before + 1


async def test_no_blocks_stay_pinned_after_cancels_and_a_killed_decode_worker(mesh: Mesh) -> None:
    (prefill,) = children(mesh, "prefill")
    rng = random.Random(0)
    done = 0
    under_way = asyncio.Event()  # set once 40 requests have finished

    async def one(i: int, http: httpx.AsyncClient) -> None:
        nonlocal done
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"{CHAT_PROMPTS[i % 20]} ({i})"}],
            "max_tokens": 8,
            "stream": True,
        }
        cancel = i % 7 == 3
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if cancel and line.startswith("data:"):
                        break  # the client hangs up mid-stream
        except httpx.HTTPError:
            pass  # requests caught by the killed worker may fail; leases are what is checked
        done += 1
        if done >= 40:
            under_way.set()

    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=120) as http:
        gate = asyncio.Semaphore(6)

        async def gated(i: int) -> None:
            async with gate:
                await one(i, http)

        tasks = [asyncio.create_task(gated(i)) for i in range(100)]
        await under_way.wait()
        victim = children(mesh, "decode")[rng.randrange(2)]
        victim.process.kill()
        await asyncio.gather(*tasks)
    assert done == 100
    for _ in range(int((LEASE_S + 5) / 0.1)):  # bounded: every lease expires by then
        if await metric(prefill, "kvmesh_engine_kv_blocks_pinned") == 0:
            break
        await asyncio.sleep(0.1)  # waiting for leases to expire (the behaviour under test)
    assert await metric(prefill, "kvmesh_engine_kv_blocks_pinned") == 0
    assert await metric(prefill, "kvmesh_worker_leases_active") == 0
    assert await metric(prefill, "kvmesh_engine_running_requests") == 0


async def test_draining_the_busy_decode_worker_lets_its_request_finish(mesh: Mesh) -> None:
    """Drain = NOT_SERVING -> deregister -> in-flight requests finish: the router must keep
    serving a request on a worker that left discovery, and no migration may be needed."""
    router = next(c for c in mesh.children if c.name == "router")
    migrations_before = await metric(router, "kvmesh_router_migrations_total")
    drained: list[worker_pb2.DrainResponse] = []

    async def drain_after_a_few_chunks(text_so_far: str) -> None:
        if not drained and len(text_so_far) > 20:
            victim = await busy_decode_worker(mesh)
            async with grpc_channel(victim) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                drained.append(await stub.Drain(worker_pb2.DrainRequest(timeout_ms=60_000)))

    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
        "max_tokens": 64,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with (
        httpx.AsyncClient(base_url=mesh.edge_url, timeout=120) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        text = await sse_text(response, drain_after_a_few_chunks)
    assert drained and drained[0].drained and drained[0].remaining_requests == 0
    assert text
    assert await metric(router, "kvmesh_router_migrations_total") == migrations_before
