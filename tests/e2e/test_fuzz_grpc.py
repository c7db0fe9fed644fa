"""Fuzzing the router's and the workers' gRPC request messages with hypothesis, bounded.

A mesh of sim workers (real processes on 127.0.0.1) takes random `GenerateRequest`s on the
router and random `PrefillRequest`s and `DecodeRequest`s (garbage KV handles included) on the
workers. Whatever they hold, the answer is a clean status (never INTERNAL or UNKNOWN), every
service still serves, and once the leases run out no KV block or lease is left.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmesh.api.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from kvmesh.rpc import open_channel
from kvmesh.up import Mesh
from tests.e2e.mesh import SIM_MODEL as MODEL
from tests.e2e.mesh import sim_mesh, still_serving_and_whole

BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
U32 = 2**32 - 1

texts = st.text(max_size=80)
token_ids = st.lists(st.integers(0, 49000), min_size=1, max_size=48) | st.lists(
    st.integers(0, U32), max_size=48
)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def sampling(draw: st.DrawFn) -> common_pb2.SamplingParams:
    """Half of the time within the valid ranges (so requests get deep), else anything."""
    params = common_pb2.SamplingParams()
    if draw(st.booleans()):
        params.max_tokens = draw(st.integers(1, 12))
        params.temperature = draw(st.floats(0.0, 2.0, width=32))
        params.top_p = draw(st.floats(0.0625, 1.0, width=32))
        params.top_k = draw(st.integers(0, 50))
        params.stop.extend(draw(st.lists(st.text(min_size=1, max_size=8), max_size=3)))
        params.top_logprobs = draw(st.integers(0, 5))
        params.logprobs = draw(st.booleans())
        params.ignore_eos = draw(st.booleans())
        return params
    if draw(st.booleans()):
        params.max_tokens = draw(st.integers(0, 24) | st.integers(0, U32))
    if draw(st.booleans()):
        params.temperature = draw(floats)
    if draw(st.booleans()):
        params.top_p = draw(floats)
    if draw(st.booleans()):
        params.top_k = draw(st.integers(-(2**31), 2**31 - 1))
    if draw(st.booleans()):
        params.seed = draw(st.integers(0, 2**64 - 1))
    params.stop.extend(draw(st.lists(texts, max_size=20)))
    params.stop_token_ids.extend(draw(st.lists(st.integers(0, U32), max_size=5)))
    params.ignore_eos = draw(st.booleans())
    params.logprobs = draw(st.booleans())
    params.top_logprobs = draw(st.integers(0, 40))
    return params


@st.composite
def generate_requests(draw: st.DrawFn) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(
        request_id=draw(st.text(max_size=20)),
        model=draw(st.sampled_from(["", MODEL, MODEL, "no-such-model"])),
        sampling=draw(sampling()),
        tenant=draw(texts),
        cache_salt=draw(texts),
        return_token_ids=draw(st.booleans()),
    )
    kind = draw(st.sampled_from(["text", "chat", "chat", "token_ids", "none"]))
    if kind == "text":
        request.text = draw(texts)
    elif kind == "chat":
        roles = st.sampled_from(["user", "system", "assistant"]) | texts
        for role, content in draw(st.lists(st.tuples(roles, texts), min_size=1, max_size=4)):
            request.chat.messages.add(role=role, content=content)
    elif kind == "token_ids":
        request.token_ids.ids.extend(draw(token_ids))
    if draw(st.integers(0, 4)) == 0:
        request.resume_token_ids.extend(draw(st.lists(st.integers(0, U32), max_size=3)))
    return request


@st.composite
def kv_handles(draw: st.DrawFn) -> common_pb2.KvHandle:
    return common_pb2.KvHandle(
        request_id=draw(texts),
        worker_id=draw(st.sampled_from(["", "prefill-0", "nobody"]) | texts),
        grpc_address=draw(st.sampled_from(["", "127.0.0.1:1"]) | texts),
        block_ids=draw(st.lists(st.integers(0, U32), max_size=8)),
        num_tokens=draw(st.integers(0, U32)),
        block_size=draw(st.integers(0, 64)),
        layout_fingerprint=draw(texts),
        block_hashes=draw(st.lists(st.integers(0, 2**64 - 1), max_size=4)),
        prompt_digest=draw(st.binary(max_size=40)),
        signature=draw(st.binary(max_size=70)),
        release_token=draw(st.binary(max_size=20)),
        engine_state=draw(st.binary(max_size=40)),
    )


@st.composite
def worker_calls(draw: st.DrawFn) -> tuple[str, Any]:
    if draw(st.booleans()):
        request = worker_pb2.PrefillRequest(
            request_id=draw(texts),
            prompt_token_ids=draw(token_ids),
            sampling=draw(sampling()),
            cache_salt=draw(texts),
        )
        if draw(st.booleans()):
            request.lease_ms = draw(st.integers(0, U32))
        return "prefill", request
    decode = worker_pb2.DecodeRequest(
        request_id=draw(texts),
        prompt_token_ids=draw(token_ids),
        generated_token_ids=draw(st.lists(st.integers(0, U32), max_size=3)),
        sampling=draw(sampling()),
        cache_salt=draw(texts),
    )
    if draw(st.booleans()):
        decode.kv_handle.CopyFrom(draw(kv_handles()))
    return "decode", decode


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with sim_mesh(
        tmp_path_factory.mktemp("fuzz") / "logs",
        speed=20,
        worker_args=["--engine-arg", "num_blocks=512", "--lease-s", "2"],
        disagg_min_tokens=0,
    ) as running:
        yield running


async def _status(call: Coroutine[Any, Any, Any]) -> grpc.StatusCode:
    try:
        await asyncio.wait_for(call, 30)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


def _on_loop(loop: asyncio.AbstractEventLoop) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine on the test's event loop from hypothesis's (synchronous) thread."""
    return lambda coroutine: asyncio.run_coroutine_threadsafe(coroutine, loop).result(60)


SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays reproducible and bounded
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


async def test_random_generate_requests_get_clean_answers(mesh: Mesh) -> None:
    run = _on_loop(asyncio.get_running_loop())
    channel = open_channel(mesh.router_address, wait_for_ready=False)
    stub = generation_pb2_grpc.GenerationStub(channel)
    seen: set[grpc.StatusCode] = set()

    @SETTINGS
    @given(generate_requests())
    def check(request: generation_pb2.GenerateRequest) -> None:
        code = run(_status(_drain(stub.Generate(request, timeout=30))))
        seen.add(code)
        assert code not in BAD, (code, request)

    try:
        await asyncio.to_thread(check)
    finally:
        await channel.close(None)
    assert grpc.StatusCode.INVALID_ARGUMENT in seen and grpc.StatusCode.OK in seen
    await still_serving_and_whole(mesh)


async def test_random_prefill_and_decode_requests_get_clean_answers(mesh: Mesh) -> None:
    run = _on_loop(asyncio.get_running_loop())
    (prefill,) = mesh.workers("prefill")
    (decode,) = mesh.workers("decode")
    channels = {
        "prefill": open_channel(prefill.address, wait_for_ready=False),
        "decode": open_channel(decode.address, wait_for_ready=False),
    }

    @SETTINGS
    @given(worker_calls())
    def check(call: tuple[str, Any]) -> None:
        tier, request = call
        if tier == "prefill":
            rpc = worker_pb2_grpc.PrefillStub(channels[tier]).Prefill(request, timeout=30)
        else:
            rpc = _drain(worker_pb2_grpc.DecodeStub(channels[tier]).Decode(request, timeout=30))
        code = run(_status(rpc))
        assert code not in BAD, (code, request)

    try:
        await asyncio.to_thread(check)
    finally:
        for channel in channels.values():
            await channel.close(None)
    await still_serving_and_whole(mesh)
