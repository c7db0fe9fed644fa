"""The async API on a tiny model: streaming, concurrency, cancellation, errors, KV moves."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from kvmesh.engine import Engine, EngineConfig
from kvmesh.engine.torch_engine import TorchEngine
from kvmesh.errors import InvalidRequestError, StoppedError, UnknownRequestError
from kvmesh.sampling import SamplingParams
from kvmesh.types import FinishReason, GenerateRequest

PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
TINY = EngineConfig(model="dummy:llama-tiny", device="cpu", block_size=4, num_blocks=64)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[TorchEngine]:
    """The engine with synchronous steps, and with async scheduling (as on a GPU)."""
    config = dataclasses.replace(TINY, async_scheduling=request.param)
    async with TorchEngine(config, show_progress=False) as eng:
        yield eng
        assert await eng.is_idle_and_whole()


async def collect(engine: Engine, request: GenerateRequest) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(request):
        tokens += out.token_ids
    return tokens


async def test_streams_tokens_until_finished(engine: TorchEngine) -> None:
    outputs = [o async for o in engine.generate(GenerateRequest("s", (5, 6, 7), PARAMS))]
    assert [len(o.token_ids) for o in outputs] == [1] * 10
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    assert all(o.finish_reason is None for o in outputs[:-1])
    assert outputs[-1].num_output_tokens == 10


async def test_concurrent_requests_equal_sequential_ones(engine: TorchEngine) -> None:
    requests = [GenerateRequest(f"c{i}", tuple(range(5, 9 + i)), PARAMS) for i in range(6)]
    together = await asyncio.gather(*(collect(engine, r) for r in requests))
    alone = [
        await collect(engine, GenerateRequest(f"solo{i}", r.prompt_token_ids, PARAMS))
        for i, r in enumerate(requests)
    ]
    assert together == alone


async def test_closing_the_stream_cancels_the_request(engine: TorchEngine) -> None:
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    stream = engine.generate(GenerateRequest("early", (5, 6, 7), long))
    async for _ in stream:
        break
    await stream.aclose()
    assert await engine.is_idle_and_whole()
    assert engine.stats().num_requests_aborted == 1


async def test_cancelling_the_consumer_task_frees_the_request(engine: TorchEngine) -> None:
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    first_token = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(GenerateRequest("task", (5, 6, 7), long)):
            first_token.set()

    task = asyncio.create_task(consume())
    await first_token.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await engine.is_idle_and_whole()


async def test_abort_by_id_ends_the_stream(engine: TorchEngine) -> None:
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    outputs = []
    async for out in engine.generate(GenerateRequest("by-id", (5, 6, 7), long)):
        outputs.append(out)
        if len(outputs) == 2:
            await engine.abort("by-id")
    assert outputs[-1].finish_reason is FinishReason.ABORT
    assert len(outputs) < 200


async def test_bad_input_raises_and_the_engine_keeps_serving(engine: TorchEngine) -> None:
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        await collect(engine, GenerateRequest("bad", (), PARAMS))
    with pytest.raises(InvalidRequestError, match="top_p"):
        await engine.prefill(GenerateRequest("bad2", (5,), SamplingParams(top_p=2.0)))
    assert len(await collect(engine, GenerateRequest("good", (5, 6), PARAMS))) == 10


async def test_duplicate_live_request_id_is_refused(engine: TorchEngine) -> None:
    long = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    stream = engine.generate(GenerateRequest("same", (5, 6, 7), long))
    await stream.__anext__()
    with pytest.raises(InvalidRequestError, match="already in use"):
        await collect(engine, GenerateRequest("same", (5, 6, 7), PARAMS))
    await stream.aclose()


async def test_prefill_then_import_on_another_engine_gives_the_same_tokens(
    engine: TorchEngine,
) -> None:
    prompt = tuple(range(10, 33))
    expected = await collect(engine, GenerateRequest("whole", prompt, PARAMS))
    async with TorchEngine(engine.core.config, show_progress=False) as decode:
        request = GenerateRequest("split", prompt, PARAMS)
        prefilled = await engine.prefill(request)
        assert prefilled.export is not None
        plan = await decode.reserve_import(request, prefilled.export)
        source = prefilled.export.block_ids[plan.num_cached_blocks :]
        decode.kv_region().write_blocks(plan.blocks_to_fill, engine.kv_region().read_blocks(source))
        await engine.release_export("split")
        tokens = list(prefilled.first.token_ids)
        async for out in decode.generate_imported(plan, tokens[0]):
            tokens += out.token_ids
        assert tokens == expected
        assert decode.stats().num_computed_tokens == len(expected) - 1
        assert await decode.is_idle_and_whole()
    with pytest.raises(UnknownRequestError):
        await engine.release_export("split")


async def test_an_unstarted_import_can_be_aborted(engine: TorchEngine) -> None:
    async with TorchEngine(engine.core.config, show_progress=False) as decode:
        request = GenerateRequest("dropped", tuple(range(10, 30)), PARAMS)
        prefilled = await engine.prefill(request)
        assert prefilled.export is not None
        await decode.reserve_import(request, prefilled.export)
        await decode.abort("dropped")
        await engine.abort("dropped")
        assert await decode.is_idle_and_whole()


async def test_stop_ends_open_streams_with_a_typed_error() -> None:
    engine = TorchEngine(TINY, show_progress=False)
    await engine.start()
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    stream = engine.generate(GenerateRequest("cut", (5, 6, 7), long))
    await stream.__anext__()
    await engine.stop()
    with pytest.raises(StoppedError):
        async for _ in stream:
            pass
    with pytest.raises(StoppedError):
        await collect(engine, GenerateRequest("after", (5, 6), PARAMS))


async def test_load_snapshot_is_published(engine: TorchEngine) -> None:
    await collect(engine, GenerateRequest("ld", (5, 6, 7), PARAMS))
    load = engine.load()
    assert load.num_blocks_total == 64
    assert load.step_seconds > 0
