"""`--engine trtllm` serving the mesh, on the fake `tensorrt_llm` (tests/contract/trtllm_fake).

The registry, two prefill and one decode worker on the trtllm engine, and a router, as real
processes on 127.0.0.1; the fake is on the workers' PYTHONPATH only. A context-only request on a
prefill worker hands its DisaggregatedParams through the router (the handle's engine state) to
the decode worker, whose generation-only request can continue only if the fake's cache
transceiver received the prefill's KV; the fake's KV events, rehashed to kvmesh's hashes, drive
the router's prefix index. A contract test: the fake follows TensorRT-LLM 1.0's documented API.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from kvmesh.api.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from kvmesh.rpc import open_channel
from kvmesh.up import Child, Mesh, UpConfig
from tests.contract.trtllm import FAKE_ROOT
from tests.e2e.mesh import metric

pytestmark = pytest.mark.contract

BLOCK = 4
PREFIX_BLOCKS = 10
FAIL_TOKEN = 999  # the fake fails a request whose prompt holds it (TRTLLM_FAKE_FAIL_ON_TOKEN)
REPO = Path(__file__).resolve().parents[2]


@dataclass
class TrtllmMesh:
    mesh: Mesh
    record: Path  # the fake's log of generation-only requests, one JSON line each

    def received(self) -> list[dict[str, object]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]


@pytest.fixture(scope="module")
async def trtllm(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TrtllmMesh]:
    root = tmp_path_factory.mktemp("trtllm-mesh")
    record = root / "generation-only.jsonl"
    with pytest.MonkeyPatch.context() as patch:
        path = os.pathsep.join(
            p for p in (str(FAKE_ROOT), str(REPO), os.environ.get("PYTHONPATH")) if p
        )
        patch.setenv("PYTHONPATH", path)  # the workers' interpreters import the fake
        patch.setenv("TRTLLM_FAKE_RECORD", str(record))
        patch.setenv("TRTLLM_FAKE_FAIL_ON_TOKEN", str(FAIL_TOKEN))
        # 400 tokens take 8 s: a stream the test cancels is still running when the cancel lands
        patch.setenv("TRTLLM_FAKE_STEP_S", "0.02")
        config = UpConfig(
            model="dummy:llama-tiny",  # vocabulary 1024; the router's model: token ids only
            num_prefill=2,
            registry_port=0,
            router_port=0,
            edge_port=0,
            device="cpu",
            disagg_min_tokens=0,  # every request prefilled on a prefill worker
            log_dir=root / "logs",
            start_timeout_s=120,
            extra_worker_args=[
                "--engine", "trtllm", "--block-size", str(BLOCK), "--ttl-s", "1",
                "--engine-arg", "events_timeout_s=0.05",
                "--engine-arg", "cache_transceiver_backend=NIXL",
            ],
        )  # fmt: skip
        running = Mesh(config)
        try:
            await running.start()
            yield TrtllmMesh(running, record)
        finally:
            await running.stop()


def prompt(group: int, question: int) -> list[int]:
    prefix = [100 + group * 50 + i for i in range(PREFIX_BLOCKS * BLOCK)]
    return [*prefix, *(500 + question * 7 + i for i in range(20))]


def router(mesh: Mesh) -> Child:
    return next(c for c in mesh.children if c.name == "router")


async def explain(mesh: Mesh, ids: list[int]) -> generation_pb2.TierDecision:
    async with open_channel(mesh.router_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=ids))
        explanation = await stub.ExplainRoute(request, timeout=10)
    return next(d for d in explanation.decisions if d.tier == common_pb2.TIER_PREFILL)


async def generate(mesh: Mesh, ids: list[int], max_tokens: int) -> tuple[list[int], int]:
    """The tokens, and the prompt tokens the prefill worker found cached."""
    async with open_channel(mesh.router_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=ids),
            sampling=common_pb2.SamplingParams(
                max_tokens=max_tokens, temperature=0, ignore_eos=True
            ),
            return_token_ids=True,
        )
        tokens, cached = [], -1
        async for response in stub.Generate(request, timeout=60):
            tokens.extend(response.token_ids)
            if response.HasField("usage"):
                cached = response.usage.cached_prompt_tokens
    return tokens, cached


async def test_the_engine_state_crosses_the_router_and_events_route_the_prefix(
    trtllm: TrtllmMesh,
) -> None:
    mesh = trtllm.mesh
    (decode,) = mesh.workers("decode")
    imported_before = await metric(decode, "kvmesh_engine_imported_tokens_total")
    received_before = len(trtllm.received())
    first = prompt(0, 0)
    tokens, cached = await generate(mesh, first, max_tokens=6)
    assert tokens == [first[-1] + 1 + i for i in range(6)]  # the toy model counts on
    assert cached == 0
    # The decode worker's generation-only request received the prefill's KV, engine to engine.
    (received,) = trtllm.received()[received_before:]
    assert received["pid"] == decode.process.pid
    assert received["num_tokens"] == len(first)
    assert received["num_transferred_blocks"] == len(first) // BLOCK
    assert received["backend"] == "NIXL"
    imported = await metric(decode, "kvmesh_engine_imported_tokens_total") - imported_before
    assert imported == len(first)
    # The fake's events, rehashed, reach the router's index: the next question of the group
    # goes where its prefix is.
    for _ in range(200):  # bounded: events travel worker -> router on their own clock
        decision = await explain(mesh, prompt(0, 1))
        if decision.reason == "prefix hit":
            break
        await asyncio.sleep(0.05)  # polling the router's view
    else:
        raise AssertionError(f"the router never saw the prefix: {decision}")
    chosen = [c for c in decision.candidates if c.chosen]
    assert len(chosen) == 1 and chosen[0].index_mode == "exact"
    assert chosen[0].cached_blocks == PREFIX_BLOCKS
    assert all(c.cached_blocks == 0 for c in decision.candidates if not c.chosen)
    tokens, cached = await generate(mesh, prompt(0, 1), max_tokens=3)
    assert cached == PREFIX_BLOCKS * BLOCK
    hits = await metric(
        router(mesh), 'kvmesh_router_prefix_blocks_total{kind="hit",tier="prefill"}'
    )
    assert hits >= PREFIX_BLOCKS


async def test_a_cancelled_stream_ends_cancelled_and_the_engine_aborts_it(
    trtllm: TrtllmMesh,
) -> None:
    mesh = trtllm.mesh
    (decode,) = mesh.workers("decode")
    # On the decode worker: a Decode call its caller cancels is aborted in the engine.
    aborted_before = await metric(decode, "kvmesh_engine_requests_aborted_total")
    async with open_channel(decode.address) as channel:
        call = worker_pb2_grpc.DecodeStub(channel).Decode(
            worker_pb2.DecodeRequest(
                request_id="cancelled",
                prompt_token_ids=prompt(1, 0),
                sampling=common_pb2.SamplingParams(max_tokens=400, temperature=0),
            )
        )
        received = 0
        async for response in call:
            received += len(response.token_ids)
            if received >= 5:  # decoding is under way: hang up
                break
        call.cancel()
        assert await call.code() is grpc.StatusCode.CANCELLED
    for _ in range(100):  # bounded, and well inside the 8 s the 400 tokens would take
        if await metric(decode, "kvmesh_engine_requests_aborted_total") > aborted_before:
            break
        await asyncio.sleep(0.05)  # polling the worker's counter
    else:
        raise AssertionError("the decode worker never aborted the cancelled request")
    # Through the router: the client's cancelled call ends CANCELLED on its side.
    async with open_channel(mesh.router_address) as channel:
        call = generation_pb2_grpc.GenerationStub(channel).Generate(
            generation_pb2.GenerateRequest(
                token_ids=generation_pb2.TokenIds(ids=prompt(1, 1)),
                sampling=common_pb2.SamplingParams(max_tokens=400, temperature=0),
            )
        )
        await anext(aiter(call))
        call.cancel()
        assert await call.code() is grpc.StatusCode.CANCELLED


async def test_engine_errors_reach_the_caller_as_their_grpc_status(trtllm: TrtllmMesh) -> None:
    """Called on the workers themselves: the router's answer to a failing decode worker is its
    own (it migrates the request, then says UNAVAILABLE), the same for every engine."""
    (decode,) = trtllm.mesh.workers("decode")
    prefill = trtllm.mesh.workers("prefill")[0]
    sampling = common_pb2.SamplingParams(max_tokens=8, temperature=0)
    async with open_channel(decode.address) as channel:
        stub = worker_pb2_grpc.DecodeStub(channel)
        failing = worker_pb2.DecodeRequest(
            request_id="fails", prompt_token_ids=[FAIL_TOKEN, *prompt(2, 0)], sampling=sampling
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in stub.Decode(failing, timeout=30):
                pass
        assert failed.value.code() is grpc.StatusCode.INTERNAL
        assert "TensorRT-LLM failed request" in (failed.value.details() or "")
    async with open_channel(prefill.address) as channel:
        invalid = worker_pb2.PrefillRequest(
            request_id="invalid", prompt_token_ids=[1, 2, 5000], sampling=sampling
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await worker_pb2_grpc.PrefillStub(channel).Prefill(invalid, timeout=30)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "outside the vocabulary" in (refused.value.details() or "")
