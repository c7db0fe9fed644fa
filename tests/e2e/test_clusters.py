"""Two clusters (east, west: one datacenter, decode worker and router each) behind one edge.

Routers: resuming a request another router streamed, shedding callers that can spill, refusing
them at once without decode workers and waking the tier for the others. The edge: a home
cluster that loses its decode worker mid-stream hands the request to the other cluster, and the
client reads one continuous answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import httpx
import pytest

from kvmesh.api.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from kvmesh.discovery import Discovery
from kvmesh.discovery.keys import wake_key
from kvmesh.rpc import open_channel
from kvmesh.rpc.spill import SPILL_KEY, SPILL_YES
from kvmesh.telemetry.scrape import scrape, total
from kvmesh.up import Mesh, UpConfig

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "Write a long story about a dragon who learns to bake bread."
SPILL = ((SPILL_KEY, SPILL_YES),)


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    log_dir: Path = tmp_path_factory.mktemp("clusters") / "logs"
    config = UpConfig(
        clusters=("east", "west"),
        num_prefill=0,
        num_decode=1,
        registry_port=0,
        router_port=0,
        edge_port=0,
        device="cpu",
        log_dir=log_dir,
        extra_worker_args=["--num-blocks", "512", "--ttl-s", "1"],
        extra_router_args=["--saturation-in-flight", "1"],
    )
    running = Mesh(config)
    try:
        await running.start()
        yield running
    finally:
        await running.stop()


@pytest.fixture(scope="module")
async def stubs(mesh: Mesh) -> AsyncIterator[dict[str, generation_pb2_grpc.GenerationAsyncStub]]:
    channels = {name: open_channel(address) for name, address in mesh.routers.items()}
    yield {name: generation_pb2_grpc.GenerationStub(c) for name, c in channels.items()}
    for channel in channels.values():
        await channel.close(None)


def chat(max_tokens: int, resume_token_ids: Sequence[int] = ()) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        chat=generation_pb2.ChatMessages(
            messages=[generation_pb2.ChatMessage(role="user", content=QUESTION)]
        ),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        return_token_ids=True,
        resume_token_ids=resume_token_ids,
    )


async def collect(
    stub: generation_pb2_grpc.GenerationAsyncStub,
    request: generation_pb2.GenerateRequest,
    metadata: tuple[tuple[str, str], ...] = (),
) -> list[generation_pb2.GenerateResponse]:
    return [m async for m in stub.Generate(request, metadata=metadata, timeout=120)]


async def test_a_resumed_request_continues_like_an_uninterrupted_one(
    stubs: dict[str, generation_pb2_grpc.GenerationAsyncStub],
) -> None:
    whole = await collect(stubs["east"], chat(24))
    tokens = [t for m in whole for t in m.token_ids]
    assert len(tokens) == 24
    cut = sum(len(m.token_ids) for m in whole[:5])  # the client had the first five messages
    streamed_text = "".join(m.text for m in whole[:5])

    resumed = await collect(stubs["west"], chat(24, resume_token_ids=tokens[:cut]))
    assert [t for m in resumed for t in m.token_ids] == tokens[cut:]
    assert streamed_text + "".join(m.text for m in resumed) == "".join(m.text for m in whole)
    assert resumed[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert resumed[-1].usage.completion_tokens == 24
    assert resumed[-1].usage.prompt_tokens == whole[-1].usage.prompt_tokens

    for bad, message in [
        ([1, 2**31], "outside the vocabulary"),
        (tokens, "24 tokens; it must be shorter than max_tokens (24)"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(stubs["west"], chat(24, resume_token_ids=bad))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (refused.value.details() or "")


async def test_a_saturated_router_sheds_callers_that_can_spill_only(
    mesh: Mesh, stubs: dict[str, generation_pb2_grpc.GenerationAsyncStub]
) -> None:
    router = mesh.child("router-east")
    shed_before = total(await scrape(router.metrics_port), "kvmesh_router_shed_total")
    long_call = stubs["east"].Generate(chat(256), timeout=120)
    try:
        await long_call.read()  # admitted and streaming: 1 in flight on 1 decode worker
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(stubs["east"], chat(2), SPILL)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 requests in flight on 1 decode workers" in (refused.value.details() or "")
        served = await collect(stubs["east"], chat(2))  # without the key: never shed
        assert served[-1].usage.completion_tokens == 2
    finally:
        long_call.cancel()
    samples = await scrape(router.metrics_port)
    assert total(samples, "kvmesh_router_shed_total", containing="saturated") == shed_before + 1
    for _ in range(200):  # bounded: the cancel reaches the router at once
        if total(samples, "kvmesh_router_requests_in_flight") == 0:
            break  # not saturated any more, for the tests after this one
        await asyncio.sleep(0.02)  # polling the router's gauge
        samples = await scrape(router.metrics_port)
    assert total(samples, "kvmesh_router_requests_in_flight") == 0


async def sse_text(response: httpx.Response, kill_home_worker: asyncio.Event) -> str:
    text = ""
    async for line in response.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line.removeprefix("data: "))
        assert "error" not in chunk, chunk
        for choice in chunk.get("choices", []):
            text += choice["delta"].get("content") or ""
        if len(text) > 20:
            kill_home_worker.set()
    return text


async def written(registry: str, model_id: str) -> dict[str, object]:
    """The decode tier's wake key, once it exists (a blocking query on it)."""
    async with Discovery(registry) as discovery:
        async for entries in discovery.kv_watch(wake_key(model_id, "decode"), wait_s=5):
            if entries:
                value: dict[str, object] = json.loads(entries[0].value)
                return value
    raise AssertionError("the watch ended")


async def wait_until_no_decode_worker(stub: generation_pb2_grpc.GenerationAsyncStub) -> None:
    for _ in range(200):  # bounded: the dead worker's TTL check fails within a second or two
        models = await stub.ListModels(generation_pb2.ListModelsRequest(), timeout=5)
        if models.models[0].num_decode_workers == 0:
            return
        await asyncio.sleep(0.05)  # polling the router's view of discovery
    raise AssertionError("the router still lists a decode worker")


async def test_home_loses_its_decode_worker_mid_stream_then_a_request_wakes_it(
    mesh: Mesh, stubs: dict[str, generation_pb2_grpc.GenerationAsyncStub]
) -> None:
    reference = await collect(stubs["west"], chat(48))
    expected = "".join(m.text for m in reference)
    (home_worker,) = [c for c in mesh.workers("decode") if c.name.startswith("decode-east")]

    # 1. The edge streams from east (home); east's only decode worker dies mid-stream; east's
    #    router has nowhere to migrate (UNAVAILABLE); the edge resumes on west.
    kill = asyncio.Event()
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 48,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }

    async def killer() -> None:
        await kill.wait()
        home_worker.process.kill()

    killing = asyncio.create_task(killer())
    async with (
        httpx.AsyncClient(base_url=mesh.edge_url, timeout=120) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        text = await sse_text(response, kill)
        edge_metrics = (await http.get("/metrics")).text
    assert killing.done(), "the stream finished before the decode worker could be killed"
    assert text == expected
    assert 'kvmesh_edge_cluster_requests_total{cluster="east",outcome="failed_over"} 1.0' in (
        edge_metrics
    )
    assert 'kvmesh_edge_cluster_requests_total{cluster="west",outcome="served"}' in edge_metrics

    # 2. East has no decode worker now: a caller that can spill is refused at once...
    await wait_until_no_decode_worker(stubs["east"])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await collect(stubs["east"], chat(4), SPILL)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert refused.value.details() == "no decode workers in this cluster"

    # 3. ...and one that cannot waits, while the router writes the wake key, until a worker
    #    joins.
    waiting = asyncio.create_task(collect(stubs["east"], chat(4)))
    wake = await asyncio.wait_for(written(mesh.registries["east"], mesh.model_id), 30)
    assert wake["router"] == mesh.routers["east"]
    assert wake["time"] > 0
    assert not waiting.done()
    await mesh.add_worker("decode", "decode-east-1", cluster="east")
    woken = await asyncio.wait_for(waiting, 120)
    assert woken[-1].usage.completion_tokens == 4
