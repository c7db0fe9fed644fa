"""The trtllm engine against the fake `tensorrt_llm` (tests/contract/trtllm_fake), in-process.

Contract tests: they check kvmesh's side of TensorRT-LLM 1.0's documented LLM API as the fake
follows it, not the library itself (docs/engines.md lists what the first real run must verify).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from kvmesh.engine import EngineConfig, create_engine, engine_names
from kvmesh.engine.trtllm import TrtllmEngine
from kvmesh.engine.trtllm.events import EventMapper
from kvmesh.engine.trtllm.library import MISSING, TrtllmMissingError
from kvmesh.errors import EngineError, InvalidRequestError, OverloadedError, StoppedError
from kvmesh.kv.errors import TransferError
from kvmesh.kv.events import AllCleared, BlockRemoved, BlockStored, KvEventLog
from kvmesh.kv.hashing import BlockHash, hash_blocks, root_hash
from kvmesh.sampling import SamplingParams
from kvmesh.types import FinishReason, GenerateRequest, TokenOutput, TransferMode
from tests.contract.trtllm import fake_tensorrt_llm

pytestmark = pytest.mark.contract

MODEL = "dummy:llama-tiny"  # vocabulary 1024, context 512
BLOCK = 4
REPO = Path(__file__).resolve().parents[3]


def config(**overrides: object) -> EngineConfig:
    options = {"events_timeout_s": "0.05"} | dict(overrides.pop("options", {}))  # type: ignore[call-overload]
    settings: dict[str, object] = {"engine": "trtllm", "model": MODEL, "block_size": BLOCK}
    return EngineConfig(**(settings | overrides), options=options)  # type: ignore[arg-type]


@pytest.fixture
def fake() -> Iterator[None]:
    with fake_tensorrt_llm():
        yield


@pytest.fixture
def engines(fake: None) -> Iterator[Callable[..., TrtllmEngine]]:
    made: list[TrtllmEngine] = []

    def make(**overrides: object) -> TrtllmEngine:
        engine = create_engine(config(**overrides))
        assert isinstance(engine, TrtllmEngine)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine._llm.shutdown()  # what stop() does last, for engines a test did not stop


@pytest.fixture
async def engine(engines: Callable[..., TrtllmEngine]) -> AsyncIterator[TrtllmEngine]:
    running = engines()
    await running.start()
    yield running
    await running.stop()


def request(rid: str, prompt: list[int], max_tokens: int = 4) -> GenerateRequest:
    return GenerateRequest(rid, tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0))


async def collect(stream: AsyncIterator[TokenOutput]) -> list[TokenOutput]:
    return [out async for out in stream]


def tokens(outputs: list[TokenOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(200):  # bounded: events and stats arrive on the library's own clock
        if predicate():
            return
        await asyncio.sleep(0.01)  # polling state the engine publishes
    raise AssertionError(f"timed out waiting for {what}")


# -- registration and a missing library -------------------------------------------------------


def test_trtllm_is_a_builtin_and_importing_it_loads_no_tensorrt_llm() -> None:
    assert "trtllm" in engine_names()
    code = (
        "import sys, kvmesh.engine.trtllm, kvmesh.engine as e;"
        "print(e.engine_names(), 'tensorrt_llm' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['torch', 'sim', 'trtllm'] False"


def test_a_missing_tensorrt_llm_is_one_clear_line() -> None:
    with pytest.raises(TrtllmMissingError) as raised:
        create_engine(config())
    assert str(raised.value) == MISSING
    assert MISSING == (
        "engine trtllm needs the tensorrt_llm package (TensorRT-LLM 1.0, NVIDIA GPUs): "
        "pip install tensorrt_llm; it is not installed here"
    )
    assert raised.value.status is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.usefixtures("fake")
def test_unknown_or_bad_options_are_refused_naming_them() -> None:
    with pytest.raises(InvalidRequestError, match="unknown trtllm engine option"):
        create_engine(config(options={"nope": "1"}))
    with pytest.raises(InvalidRequestError, match="cache_transceiver_backend must be one of"):
        create_engine(config(options={"cache_transceiver_backend": "carrier-pigeon"}))


# -- requests ---------------------------------------------------------------------------------


async def test_info_says_engine_mode_and_no_kv_region(engine: TrtllmEngine) -> None:
    assert engine.info.engine == "trtllm"
    assert engine.info.transfer_mode is TransferMode.ENGINE
    assert engine.kv_region() is None
    assert engine.info.layout_fingerprint.startswith("kvmesh-trtllm/v1:dummy:llama-tiny:B4:UCX")


async def test_generate_streams_tokens_until_the_length_limit(engine: TrtllmEngine) -> None:
    outputs = await collect(engine.generate(request("g", [10, 11, 12], max_tokens=5)))
    assert tokens(outputs) == [13, 14, 15, 16, 17]  # the fake's toy model counts
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    assert [o.finished for o in outputs].count(True) == 1
    assert await engine.is_idle_and_whole()


async def test_prefill_exports_its_params_and_another_engine_continues(
    engines: Callable[..., TrtllmEngine],
) -> None:
    prefill, decode = engines(), engines()  # two LLMs: the KV must cross the transceiver
    await prefill.start()
    await decode.start()
    try:
        prompt = list(range(100, 110))
        result = await prefill.prefill(request("p", prompt, max_tokens=5))
        assert result.first.token_ids == [110] and result.first.finish_reason is None
        export = result.export
        assert export is not None and export.num_tokens == 10 and export.block_ids == ()
        state = json.loads(export.opaque)
        assert state["format"] == "kvmesh-trtllm/v1"
        assert state["first_gen_tokens"] == [110] and isinstance(state["ctx_request_id"], int)
        assert state["opaque_state"]  # the transceiver's state, base64
        plan = await decode.reserve_import(request("d", prompt, max_tokens=5), export)
        assert plan.filled_by_engine and plan.blocks_to_fill == ()
        assert plan.num_tokens == 10 and len(plan.block_ids) == 3
        outputs = await collect(decode.generate_imported(plan, 110))
        assert tokens(outputs) == [111, 112, 113, 114]  # after the first token
        assert outputs[0].num_cached_tokens == 10
        assert decode.stats().num_imported_tokens == 10
        await prefill.release_export("p")
        assert await prefill.is_idle_and_whole() and await decode.is_idle_and_whole()
        # The KV moved once: the same state again finds nothing to receive.
        with pytest.raises(TransferError, match="the KV did not arrive"):
            await decode.reserve_import(request("again", prompt, max_tokens=5), export)
        assert await decode.is_idle_and_whole()
    finally:
        await prefill.stop()
        await decode.stop()


async def test_unreadable_or_foreign_engine_state_is_a_transfer_error(
    engine: TrtllmEngine,
) -> None:
    prompt = list(range(20, 30))
    result = await engine.prefill(request("p", prompt))
    assert result.export is not None
    state = json.loads(result.export.opaque)
    forged = replace(result.export, opaque=json.dumps(state | {"opaque_state": "Zm9v"}).encode())
    with pytest.raises(TransferError, match="Failed to receive the KV cache"):
        await engine.reserve_import(request("d1", prompt), forged)
    with pytest.raises(TransferError, match="unreadable"):
        await engine.reserve_import(request("d2", prompt), replace(forged, opaque=b"\x00"))
    with pytest.raises(TransferError, match="holds 10 tokens"):
        await engine.reserve_import(request("d3", [*prompt, 1]), result.export)
    await engine.release_export("p")
    assert await engine.is_idle_and_whole()


async def test_an_import_reservation_aborted_before_streaming_is_gone(
    engine: TrtllmEngine,
) -> None:
    prompt = list(range(40, 48))
    result = await engine.prefill(request("p", prompt, max_tokens=6))
    assert result.export is not None
    await engine.reserve_import(request("d", prompt, max_tokens=6), result.export)
    assert not await engine.is_idle_and_whole()
    await engine.abort("d")  # the lease ran out during the transfer: the import is dropped
    await engine.release_export("p")
    assert await engine.is_idle_and_whole()
    assert engine.stats().num_requests_aborted == 1


async def test_a_first_token_that_ends_the_request_exports_nothing(engine: TrtllmEngine) -> None:
    result = await engine.prefill(request("p", [5, 6, 7], max_tokens=1))
    assert result.first.finish_reason is FinishReason.LENGTH and result.export is None
    stop = GenerateRequest("s", (5, 6, 7), SamplingParams(max_tokens=9, stop_token_ids=(8,)))
    result = await engine.prefill(stop)
    assert result.first.finish_reason is FinishReason.STOP and result.export is None
    assert result.first.stop_reason == 8
    assert await engine.is_idle_and_whole()


# -- cancellation, errors -----------------------------------------------------------------------


async def test_closing_the_stream_early_aborts_the_request(engine: TrtllmEngine) -> None:
    stream = engine.generate(request("c", [1, 2, 3], max_tokens=400))
    assert isinstance(stream, AsyncIterator)
    first = await anext(stream)
    assert first.token_ids
    await stream.aclose()  # type: ignore[attr-defined]
    assert await engine.is_idle_and_whole()
    assert engine.stats().num_requests_aborted == 1


async def test_abort_ends_the_stream_with_abort(engine: TrtllmEngine) -> None:
    stream = engine.generate(request("a", [1, 2, 3], max_tokens=400))
    await anext(stream)
    await engine.abort("a")
    rest = await collect(stream)
    assert rest[-1].finish_reason is FinishReason.ABORT
    assert len(tokens(rest)) < 399


async def test_errors_map_to_kvmesh_errors_and_grpc_statuses(
    engines: Callable[..., TrtllmEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRTLLM_FAKE_FAIL_ON_TOKEN", "666")
    engine = engines(max_num_seqs=1, max_num_waiting=1)
    await engine.start()
    try:
        with pytest.raises(InvalidRequestError) as invalid:
            engine.generate(request("bad", [5000]))  # outside the vocabulary: before streaming
        assert invalid.value.status is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(EngineError) as failed:
            await collect(engine.generate(request("fail", [666, 1], max_tokens=8)))
        assert failed.value.status is grpc.StatusCode.INTERNAL
        held = [engine.generate(request(f"h{i}", [1, 2], max_tokens=400)) for i in range(2)]
        await asyncio.gather(*(anext(s) for s in held))
        with pytest.raises(OverloadedError) as overloaded:
            engine.generate(request("third", [1, 2]))
        assert overloaded.value.status is grpc.StatusCode.RESOURCE_EXHAUSTED
        await engine.stop()
        for stream in held:  # open streams end with StoppedError
            with pytest.raises(StoppedError):
                await collect(stream)
    finally:
        await engine.stop()


# -- events, load, stats ----------------------------------------------------------------------


async def test_events_reach_the_log_under_kvmesh_hashes(engine: TrtllmEngine) -> None:
    prompt = list(range(200, 212))  # three full blocks
    outputs = await collect(engine.generate(request("e", prompt, max_tokens=2)))
    sequence = prompt + tokens(outputs)
    # What the router computes, from the worker's model and KV dtype.
    expected = hash_blocks(sequence, BLOCK, root_hash(MODEL, kv_dtype=engine.info.kv_dtype))

    def stored() -> list[BlockHash]:
        batch = engine.kv_events.read_after(0)
        return [h for e in batch.events if isinstance(e, BlockStored) for h in e.block_hashes]

    await eventually(lambda: stored() == expected, "BlockStored under kvmesh's hashes")
    hashes, last_id = await engine.kv_snapshot()
    assert sorted(hashes) == sorted(expected) and last_id == engine.kv_events.last_event_id
    again = await collect(engine.generate(request("e2", [*prompt, 7], max_tokens=1)))
    assert again[0].num_cached_tokens == 12  # the prefix as the events describe it


async def test_load_and_stats_follow_the_iteration_stats(
    engines: Callable[..., TrtllmEngine],
) -> None:
    engine = engines(num_blocks=64)
    await engine.start()
    try:
        await collect(engine.generate(request("s", [1, 2, 3, 4, 5], max_tokens=3)))
        await eventually(
            lambda: engine.load().num_blocks_total == 64 and engine.load().num_running == 0,
            "the iteration stats after the request",
        )
        assert engine.info.num_blocks == 64
        load = engine.load()
        assert load.num_running == 0 and load.step_seconds > 0
        stats = engine.stats()
        assert stats.num_prompt_tokens == 5 and stats.num_generated_tokens == 3
        assert stats.num_requests_finished == 1 and stats.num_steps > 0
    finally:
        await engine.stop()


# -- the event mapping, alone -----------------------------------------------------------------


def _stored(
    parent: int | None, *blocks: tuple[int, list[int]], extra: int = 0
) -> dict[str, object]:
    return {
        "event_id": 0,
        "data": {
            "type": "stored",
            "parent_hash": parent,
            "blocks": [
                {
                    "block_hash": h,
                    "tokens": [{"token_id": t, "token_extra_id": extra} for t in toks],
                }
                for h, toks in blocks
            ],
        },
    }


def test_the_mapper_rehashes_chains_and_follows_removals() -> None:
    log = KvEventLog()
    mapper = EventMapper("m", "bfloat16", 2, log)
    root = root_hash("m", kv_dtype="bfloat16")
    mapper.apply(_stored(None, (901, [1, 2]), (902, [3, 4])))
    mapper.apply(_stored(902, (903, [5, 6])))
    expected = hash_blocks([1, 2, 3, 4, 5, 6], 2, root)
    mapper.apply({"event_id": 3, "data": {"type": "removed", "block_hashes": [903, 777]}})
    mapper.apply({"event_id": 4, "data": {"type": "created"}})
    events = log.read_after(0).events
    assert events[0] == BlockStored(1, tuple(expected[:2]), None)
    assert events[1] == BlockStored(2, (expected[2],), expected[1])
    assert events[2] == BlockRemoved(3, (expected[2],))
    assert events[3] == AllCleared(4)
    assert mapper.cached_hashes() == []


def test_the_mapper_skips_what_kvmesh_hashes_cannot_describe() -> None:
    log = KvEventLog()
    mapper = EventMapper("m", "bfloat16", 2, log)
    mapper.apply(_stored(12345, (1, [1, 2])))  # a parent whose event never came
    mapper.apply(_stored(None, (2, [1, 2]), (3, [3])))  # a partial block ends the chain
    mapper.apply(_stored(None, (4, [7, 8]), extra=9))  # multimodal / LoRA content
    assert mapper.num_skipped_blocks == 3
    (event,) = log.read_after(0).events
    root = root_hash("m", kv_dtype="bfloat16")
    assert event == BlockStored(1, (hash_blocks([1, 2], 2, root)[0],), None)
    assert mapper.num_cached_prefix_tokens([1, 2, 3, 4], "") == 2
    assert mapper.num_cached_prefix_tokens([1, 2, 3, 4], "tenant") == 0
