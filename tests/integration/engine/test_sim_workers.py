"""Sim workers as real processes: registry, one prefill and one decode worker (`--engine sim`),
a router and the edge on 127.0.0.1; a chat completion streams through the disaggregated path,
its KV moved by the sim engine (TransferMode.ENGINE) and its lease released by RPC."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from kvmesh.telemetry.scrape import scrape, total
from kvmesh.up import Child, Mesh
from tests.e2e.mesh import SIM_MODEL as MODEL
from tests.e2e.mesh import sim_mesh

MAX_TOKENS = 12


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with sim_mesh(
        tmp_path_factory.mktemp("sim-mesh") / "logs",
        speed=10,
        worker_args=["--engine-arg", "gpu=H100", "--engine-arg", "num_blocks=512"],
        disagg_min_tokens=0,  # every request prefilled on the prefill worker
        start_timeout_s=120,
    ) as running:
        yield running


def worker(mesh: Mesh, tier: str) -> Child:
    (child,) = mesh.workers(tier)
    return child


async def metric(child: Child, name: str, containing: str = "") -> float:
    return total(await scrape(child.metrics_port), name, containing=containing)


async def test_a_chat_completion_streams_through_prefill_and_decode(mesh: Mesh) -> None:
    prefill, decode = worker(mesh, "prefill"), worker(mesh, "decode")
    prefills_before = await metric(
        prefill, "kvmesh_rpc_server_handled_total", containing='"kvmesh.v1.Prefill"'
    )
    imported_before = await metric(decode, "kvmesh_engine_imported_tokens_total")
    openai = AsyncOpenAI(base_url=f"{mesh.edge_url}/v1", api_key="unused", max_retries=0)
    (model,) = [m.id async for m in openai.models.list()]
    assert model == MODEL
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Name three colours of the rainbow, please."}
    ]
    stream = await openai.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert finish == "length"  # the sim never emits EOS
    assert usage is not None and usage.completion_tokens == MAX_TOKENS
    assert text  # SmolLM2's tokenizer detokenized the sim's token ids
    prefills = await metric(
        prefill, "kvmesh_rpc_server_handled_total", containing='"kvmesh.v1.Prefill"'
    )
    assert prefills == prefills_before + 1
    imported = await metric(decode, "kvmesh_engine_imported_tokens_total")
    assert imported - imported_before == usage.prompt_tokens
    # The decode worker computed only what it generated: the prompt's KV came from prefill.
    assert await metric(decode, "kvmesh_engine_computed_tokens_total") < usage.prompt_tokens
