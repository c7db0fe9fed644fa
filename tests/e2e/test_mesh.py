"""The whole mesh as real processes: registry, prefill, decode, router, edge (disaggregated)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import httpx
import pytest
from openai import AsyncOpenAI

from kvmesh.api.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.bench.prompts import CHAT_PROMPTS
from kvmesh.engine import EngineConfig
from kvmesh.engine.torch_engine import TorchCore
from kvmesh.kv.hashing import hash_blocks, root_hash
from kvmesh.sampling import SamplingParams
from kvmesh.up import Mesh
from tests.e2e.mesh import children, grpc_channel, metric, running_mesh
from tests.helpers import generate

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = CHAT_PROMPTS[:4]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with running_mesh(tmp_path_factory.mktemp("mesh")) as running:
        yield running


@pytest.fixture(scope="module")
def reference() -> TorchCore:
    return TorchCore(EngineConfig(model="smollm2", device="cpu"), show_progress=False)


@pytest.fixture(scope="module")
def expected_texts(reference: TorchCore) -> list[str]:
    tokenizer = reference.tokenizer
    assert tokenizer is not None
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    outputs = generate(reference, prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return [tokenizer.decode(tokens) for tokens in outputs]


def client(mesh: Mesh) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{mesh.edge_url}/v1", api_key="unused", max_retries=0)


async def test_openai_client_chat_matches_the_engines_greedy_output(
    mesh: Mesh, expected_texts: list[str]
) -> None:
    openai = client(mesh)
    for prompt, expected in zip(PROMPTS, expected_texts, strict=True):
        messages = [{"role": "user", "content": prompt}]
        reply = await openai.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0,
            max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
        )
        assert reply.choices[0].message.content == expected
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        streamed = ""
        stream = await openai.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0,
            max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices:
                streamed += chunk.choices[0].delta.content or ""
        assert streamed == expected


async def test_openai_client_completions(mesh: Mesh, reference: TorchCore) -> None:
    tokenizer = reference.tokenizer
    assert tokenizer is not None
    text = "The capital of France is"
    prompt = tokenizer.encode(text, add_special_tokens=True)
    tokens = generate(reference, [prompt], SamplingParams(max_tokens=16, temperature=0.0))[0]
    expected = tokenizer.decode(tokens)
    openai = client(mesh)
    reply = await openai.completions.create(model=MODEL, prompt=text, max_tokens=16, temperature=0)
    assert reply.choices[0].text == expected
    streamed = ""
    async for chunk in await openai.completions.create(
        model=MODEL, prompt=text, max_tokens=16, temperature=0, stream=True
    ):
        streamed += chunk.choices[0].text if chunk.choices else ""
    assert streamed == expected


async def test_the_kv_moved_instead_of_being_recomputed(mesh: Mesh, reference: TorchCore) -> None:
    (decode,) = children(mesh, "decode")
    unique = "Describe, in a few words, the colour of a ripe lemon and of a clear sky at noon."
    tokenizer = reference.tokenizer
    assert tokenizer is not None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": unique}])
    # What the decode worker already caches (the chat template's system prompt, say) is not sent.
    async with grpc_channel(decode) as channel:
        snapshot = await worker_pb2_grpc.WorkerStub(channel).GetKvSnapshot(
            worker_pb2.GetKvSnapshotRequest()
        )
    cached = set(snapshot.block_hashes)
    hashes = hash_blocks(prompt, 16, root_hash(MODEL, kv_dtype="float32"))  # as workers hash
    reused = next((i for i, h in enumerate(hashes) if h not in cached), len(hashes))
    lacked = math.ceil(len(prompt) / 16) - reused

    before_computed = await metric(decode, "kvmesh_engine_computed_tokens_total")
    before_bytes = await metric(decode, "kvmesh_kv_transfer_bytes_total")
    reply = await client(mesh).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": unique}], temperature=0, max_tokens=12
    )
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(prompt)
    computed = await metric(decode, "kvmesh_engine_computed_tokens_total") - before_computed
    received = await metric(decode, "kvmesh_kv_transfer_bytes_total") - before_bytes
    # The first token came from the prefill worker; the decode worker computed only the tokens
    # generated after it, and not one prompt token.
    assert computed == reply.usage.completion_tokens - 1
    bytes_per_block = 30 * 16 * 2 * 3 * 64 * 4  # layers x block x (K, V) x heads x dim x float32
    assert lacked > 0
    assert received == lacked * bytes_per_block


def chat_body(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ("{not json", 400, "json"),
        ({"model": MODEL, "messages": "hello"}, 400, "messages"),
        (chat_body(model="no-such-model"), 404, "model"),
        (chat_body(messages=[]), 400, "messages"),
        (chat_body(max_tokens=0), 400, "max_tokens"),
        (chat_body(max_tokens=10**9), 400, "context"),
        (chat_body(temperature=-1), 400, "temperature"),
        (chat_body(top_p=1.5), 400, "top_p"),
        (chat_body(messages=[{"role": "user", "content": "word " * 9000}]), 400, "context"),
    ],
)
async def test_bad_chat_input_gets_an_openai_style_4xx(
    mesh: Mesh, body: object, status: int, fragment: str
) -> None:
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=60) as http:
        if isinstance(body, str):
            response = await http.post(
                "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            )
        else:
            response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert fragment in error["message"].lower()
        assert error["type"]


async def test_token_ids_outside_the_vocabulary_are_refused(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=60) as http:
        response = await http.post(
            "/v1/completions", json={"model": MODEL, "prompt": [1, 2, 10**7], "max_tokens": 4}
        )
        assert response.status_code == 400
        assert "vocabulary" in response.json()["error"]["message"]


async def test_nothing_leaks_after_bad_input_and_the_mesh_keeps_serving(mesh: Mesh) -> None:
    reply = await client(mesh).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say yes."}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None
    for child in children(mesh, "decode") + children(mesh, "prefill"):
        assert await metric(child, "kvmesh_engine_running_requests") == 0
        assert await metric(child, "kvmesh_engine_waiting_requests") == 0
    async with httpx.AsyncClient(base_url=mesh.edge_url) as http:
        assert (await http.get("/health")).status_code == 200


async def test_streaming_client_disconnect_cancels_the_request(mesh: Mesh) -> None:
    (decode,) = children(mesh, "decode")
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=60) as http:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Count from one to one thousand."}],
            "max_tokens": 1000,
            "stream": True,
            "ignore_eos": True,
        }
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            chunks = 0
            async for line in response.aiter_lines():
                chunks += line.startswith("data:")
                if chunks == 5:  # decoding is under way on the decode worker: hang up
                    break
    for _ in range(200):  # bounded: the decode worker must drop the request
        if await metric(decode, "kvmesh_engine_running_requests") == 0:
            break
        await asyncio.sleep(0.05)  # polling the worker's metrics
    assert await metric(decode, "kvmesh_engine_running_requests") == 0
    assert await metric(decode, "kvmesh_engine_requests_aborted_total") >= 1


async def test_logprobs_carry_token_text(mesh: Mesh) -> None:
    reply = await client(mesh).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=2,
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens).startswith(choice.message.content or "")
    for token in tokens:
        assert token.logprob <= 0
        assert len(token.top_logprobs) == 2
        assert token.top_logprobs[0].token == token.token  # greedy: the chosen one is the likeliest
