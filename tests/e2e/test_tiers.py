"""Heterogeneous tiers as real processes: per-tier worker options, KV across attention backends
and block sizes, and a prefill worker whose KV no decode worker can read.

Five workers, started by `kvmesh.up.Mesh` (every worker gets `--attention-backend paged`, then
its tier's arguments, then `add_worker`'s):

    prefill sdpa   B16  (UpConfig.extra_prefill_args)   decode paged  B16  (the shared one)
    prefill paged  B64  (Mesh.add_worker)               decode sdpa   B64  (Mesh.add_worker)
    prefill sim         (Mesh.add_worker: the sim engine, its own opaque KV format)

Routers restricted to two workers each (`--only-workers`) fix the pairs: sdpa -> paged and
paged -> sdpa share KV as it is (equal layouts whatever the backend); B64 -> B16 and B16 -> B64
convert it on import (issue 14); sim -> torch cannot, so that router serves aggregated and says
why, and the torch decode worker refuses a sim handle. Every answer must be the greedy text of
one engine on the sdpa backend (the aggregated path's).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from kvmesh.api.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from kvmesh.engine import EngineConfig
from kvmesh.engine.torch_engine import TorchCore
from kvmesh.rpc import open_channel
from kvmesh.sampling import SamplingParams
from kvmesh.telemetry.scrape import scrape, total
from kvmesh.up import Child, Mesh, UpConfig
from tests.e2e.mesh import grpc_channel, metric
from tests.helpers import generate

SDPA_16, PAGED_16 = "prefill-sdpa-b16", "decode-paged-b16"
PAGED_64, SDPA_64 = "prefill-paged-b64", "decode-sdpa-b64"
SIM = "prefill-sim"
QUESTION = "In two sentences, explain why the sky looks blue at noon and red at sunset."
# Another prompt for the aggregated path: QUESTION's KV is cached on the B32 decode worker by
# then, and a prompt mostly cached on decode goes aggregated whatever the layouts.
OTHER_QUESTION = "Name three rivers of Europe and the seas they flow into, in one sentence each."
MAX_TOKENS = 16
# Twenty prompts for each converting pair: long enough that each is disaggregated even where
# the decode worker holds the chat template's first blocks.
TOPICS = (
    "tides",
    "volcanoes",
    "rainbows",
    "glaciers",
    "bread",
    "compilers",
    "bees",
    "comets",
    "coral reefs",
    "magnets",
    "clouds",
    "bicycles",
    "honey",
    "deserts",
    "lightning",
    "cheese",
    "owls",
    "batteries",
    "earthquakes",
    "tea",
)
CONVERTED = tuple(f"Explain in detail how {t} work, for a curious child of ten." for t in TOPICS)
# layers x block x (K, V) x KV heads x head dim x float32, per token of a block
BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    config = UpConfig(
        registry_port=0,
        router_port=0,
        edge_port=0,
        device="cpu",
        disagg_min_tokens=16,
        log_dir=tmp_path_factory.mktemp("tiers") / "logs",
        extra_worker_args=["--num-blocks", "128", "--attention-backend", "paged"],
        extra_prefill_args=["--worker-id", SDPA_16, "--attention-backend", "sdpa"],  # wins
        extra_decode_args=["--worker-id", PAGED_16],
        extra_router_args=["--only-workers", f"{SDPA_16},{PAGED_16}"],
    )
    running = Mesh(config)
    try:
        await running.start()
        await asyncio.gather(
            running.add_worker(
                "prefill",
                "prefill-b64",
                ["--worker-id", PAGED_64, "--attention-backend", "paged", "--block-size", "64"],
            ),
            running.add_worker(
                "decode",
                "decode-b64",
                ["--worker-id", SDPA_64, "--attention-backend", "sdpa", "--block-size", "64"],
            ),
            running.add_worker("prefill", "prefill-sim", ["--worker-id", SIM, "--engine", "sim"]),
        )
        yield running
    finally:
        await running.stop()


@pytest.fixture(scope="module")
def reference() -> TorchCore:
    config = EngineConfig(model="smollm2", device="cpu", attention_backend="sdpa")
    return TorchCore(config, show_progress=False)


@dataclass(frozen=True, slots=True)
class Expected:
    prompt: list[int]
    token_ids: list[int]
    text: str


@pytest.fixture(scope="module")
def expected(reference: TorchCore) -> dict[str, Expected]:
    """Each question's greedy answer on one engine, sdpa backend."""
    tokenizer = reference.tokenizer
    assert tokenizer is not None
    questions = (QUESTION, OTHER_QUESTION, *CONVERTED)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    outputs = generate(reference, prompts, greedy)
    return {
        q: Expected(prompt, tokens, tokenizer.decode(tokens))
        for q, prompt, tokens in zip(questions, prompts, outputs, strict=True)
    }


def worker(mesh: Mesh, worker_id: str) -> Child:
    return next(
        c for c in mesh.workers("prefill") + mesh.workers("decode") if c.worker_id == worker_id
    )


async def router_of(mesh: Mesh, name: str, *worker_ids: str) -> Child:
    """A router that sees only `worker_ids`, once it knows them all."""
    if name != "router":
        await mesh.add_router(name, ["--only-workers", ",".join(worker_ids)])
    router = mesh.child(name)
    async with grpc_channel(router) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # each worker's GetInfo reaches the router in turn
            (model,) = (await stub.ListModels(generation_pb2.ListModelsRequest())).models
            if model.num_prefill_workers == 1 and model.num_decode_workers == 1:
                return router
            await asyncio.sleep(0.1)  # polling the router's view of discovery
    raise AssertionError(f"{name} did not see {worker_ids} in time")


async def ask(router: Child, question: str) -> generation_pb2.GenerateResponse:
    """A greedy chat request; one response holding all its tokens, text, usage, timings."""
    request = generation_pb2.GenerateRequest(
        chat=generation_pb2.ChatMessages(
            messages=[generation_pb2.ChatMessage(role="user", content=question)]
        ),
        sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
        return_token_ids=True,
    )
    whole = generation_pb2.GenerateResponse()
    async with grpc_channel(router) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        async for response in stub.Generate(request, timeout=120):
            whole.token_ids.extend(response.token_ids)
            whole.text += response.text
            if response.HasField("usage"):
                whole.usage.CopyFrom(response.usage)
                whole.timings.CopyFrom(response.timings)
    return whole


async def test_each_tier_runs_the_options_given_to_it(mesh: Mesh) -> None:
    """Shared options, then the tier's, then add_worker's: the last one wins."""
    backends = {}
    async with httpx.AsyncClient(base_url=f"http://{mesh.registry_address}") as http:
        for tier in ("prefill", "decode"):
            response = await http.get(f"/v1/health/service/kvmesh-{tier}")
            for entry in response.json():
                meta = entry["Service"]["Meta"]
                backends[meta["worker_id"]] = (meta["attention_backend"], meta["block_size"])
    assert backends == {
        SDPA_16: ("sdpa", "16"),
        PAGED_16: ("paged", "16"),
        PAGED_64: ("paged", "64"),
        SDPA_64: ("sdpa", "64"),
        SIM: ("sim", "16"),
    }


@pytest.mark.parametrize(
    ("router_name", "prefill_id", "decode_id", "block_size"),
    [("router", SDPA_16, PAGED_16, 16), ("router-paged-sdpa", PAGED_64, SDPA_64, 64)],
    ids=["sdpa-to-paged", "paged-to-sdpa"],
)
async def test_kv_moves_between_backends_and_the_text_is_one_backends(
    mesh: Mesh,
    expected: dict[str, Expected],
    router_name: str,
    prefill_id: str,
    decode_id: str,
    block_size: int,
) -> None:
    router = await router_of(mesh, router_name, prefill_id, decode_id)
    decode = worker(mesh, decode_id)
    received_before = await metric(decode, "kvmesh_kv_transfer_bytes_total")
    computed_before = await metric(decode, "kvmesh_engine_computed_tokens_total")

    answer = await ask(router, QUESTION)

    reference = expected[QUESTION]
    assert list(answer.token_ids) == reference.token_ids
    assert answer.text == reference.text
    assert answer.usage.prompt_tokens == len(reference.prompt)
    assert answer.timings.prefill_s > 0  # a prefill worker prefilled
    received = await metric(decode, "kvmesh_kv_transfer_bytes_total") - received_before
    computed = await metric(decode, "kvmesh_engine_computed_tokens_total") - computed_before
    # The KV moved: whole blocks arrived, and decode computed only the tokens after the first.
    assert received > 0
    assert received % (block_size * BYTES_PER_TOKEN) == 0
    assert computed == answer.usage.completion_tokens - 1


@pytest.mark.parametrize(
    ("router_name", "prefill_id", "decode_id", "prefill_block_size"),
    [("router-64-to-16", PAGED_64, PAGED_16, 64), ("router-16-to-64", SDPA_16, SDPA_64, 16)],
    ids=["b64-to-b16", "b16-to-b64"],
)
async def test_kv_of_another_block_size_is_converted_on_import(
    mesh: Mesh,
    expected: dict[str, Expected],
    router_name: str,
    prefill_id: str,
    decode_id: str,
    prefill_block_size: int,
) -> None:
    """Twenty prompts through a pair of workers of different block sizes: each is prefilled
    there, its KV read in the prefill worker's blocks and re-packed into the decode worker's,
    and the greedy text is the aggregated path's."""
    router = await router_of(mesh, router_name, prefill_id, decode_id)
    decode = worker(mesh, decode_id)
    received_before = await metric(decode, "kvmesh_kv_transfer_bytes_total")

    answers = [await ask(router, question) for question in CONVERTED]

    for question, answer in zip(CONVERTED, answers, strict=True):
        reference = expected[question]
        assert list(answer.token_ids) == reference.token_ids, question
        assert answer.text == reference.text
        assert answer.timings.prefill_s > 0, question  # a prefill worker prefilled
    received = await metric(decode, "kvmesh_kv_transfer_bytes_total") - received_before
    assert received > 0
    assert received % (prefill_block_size * BYTES_PER_TOKEN) == 0  # the prefill's blocks moved
    assert await metric(decode, "kvmesh_engine_kv_blocks_pinned") == 0


SIM_DIFFERENCE = "format kvmesh-sim/v1 vs kvmesh-kv/v1; transfer mode engine vs mesh"


async def test_a_pair_that_cannot_convert_is_served_aggregated_and_says_why(
    mesh: Mesh, expected: dict[str, Expected]
) -> None:
    router = await router_of(mesh, "router-sim", SIM, PAGED_16)
    prefill, decode = worker(mesh, SIM), worker(mesh, PAGED_16)
    prefill_computed_before = await metric(prefill, "kvmesh_engine_computed_tokens_total")

    answer = await ask(router, OTHER_QUESTION)

    reference = expected[OTHER_QUESTION]
    assert list(answer.token_ids) == reference.token_ids
    assert answer.text == reference.text
    assert answer.timings.prefill_s == 0  # no prefill worker was asked
    assert await metric(prefill, "kvmesh_engine_computed_tokens_total") == prefill_computed_before
    samples = await scrape(router.metrics_port)
    reason = 'reason="no_compatible_prefill"'
    assert total(samples, "kvmesh_router_decisions_total", containing=reason) == 1
    warnings = [
        line
        for line in router.log_path.read_text().splitlines()
        if "KV layouts incompatible" in line
    ]
    assert len(warnings) == 1, warnings
    warning = json.loads(warnings[0])
    assert (warning["prefill_worker"], warning["decode_worker"]) == (SIM, PAGED_16)
    assert warning["difference"] == SIM_DIFFERENCE
    assert await metric(decode, "kvmesh_engine_kv_blocks_pinned") == 0


async def test_decode_refuses_a_handle_it_cannot_read_and_leaks_nothing(
    mesh: Mesh, expected: dict[str, Expected]
) -> None:
    prefill, decode = worker(mesh, SIM), worker(mesh, PAGED_16)
    reference = expected[QUESTION]
    async with grpc_channel(prefill) as channel:
        prefilled = await worker_pb2_grpc.PrefillStub(channel).Prefill(
            worker_pb2.PrefillRequest(
                request_id="refused",
                prompt_token_ids=reference.prompt,
                sampling=common_pb2.SamplingParams(
                    max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True
                ),
            ),
            timeout=60,
        )
    handle = prefilled.kv_handle
    assert handle.block_ids
    used_before = await metric(decode, "kvmesh_engine_kv_blocks_used")

    request = worker_pb2.DecodeRequest(
        request_id="refused",
        prompt_token_ids=reference.prompt,
        generated_token_ids=[prefilled.first_token_id],
        sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
        kv_handle=handle,
    )
    channel = open_channel(decode.address)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in worker_pb2_grpc.DecodeStub(channel).Decode(request, timeout=60):
                pass
    finally:
        await channel.close(None)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = refused.value.details() or ""
    assert f"cannot import KV: prefill worker {SIM!r} wrote layout" in details
    assert SIM_DIFFERENCE.split(";")[0] in details
    assert handle.layout_fingerprint in details and ":B16:f32" in details

    # Nothing was reserved on decode; the lease on prefill is still the router's to release.
    assert await metric(decode, "kvmesh_engine_kv_blocks_pinned") == 0
    assert await metric(decode, "kvmesh_engine_kv_blocks_used") == used_before
    async with grpc_channel(prefill) as channel:
        transfer = worker_pb2_grpc.KvTransferStub(channel)
        release = worker_pb2.ReleaseLeaseRequest(request_id=handle.request_id)  # the lease's
        with pytest.raises(grpc.aio.AioRpcError) as not_holder:  # no token: not the holder
            await transfer.ReleaseLease(release)
        assert not_holder.value.code() == grpc.StatusCode.PERMISSION_DENIED
        release.release_token = handle.release_token
        released = await transfer.ReleaseLease(release)
        assert released.released
        stats = await transfer.GetTransferStats(worker_pb2.GetTransferStatsRequest())
    assert stats.pinned_blocks == 0 and stats.active_leases == 0
