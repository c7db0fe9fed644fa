"""Streaming text from the async engine on SmolLM2: detokenization and stop strings."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kvmesh.engine import EngineConfig
from kvmesh.engine.torch_engine import TorchEngine
from kvmesh.sampling import SamplingParams
from kvmesh.types import FinishReason, GenerateRequest


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[TorchEngine]:
    async with TorchEngine(EngineConfig(model="smollm2", device="cpu"), show_progress=False) as e:
        yield e
        assert await e.is_idle_and_whole()


def chat(engine: TorchEngine, text: str) -> tuple[int, ...]:
    assert engine.tokenizer is not None
    return tuple(engine.tokenizer.apply_chat_template([{"role": "user", "content": text}]))


async def test_streamed_text_equals_decoding_all_tokens(engine: TorchEngine) -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0)
    request = GenerateRequest("text", chat(engine, "Write a haiku about rain."), params)
    tokens, text = [], ""
    async for out in engine.generate(request):
        tokens += out.token_ids
        text += out.text
    assert engine.tokenizer is not None
    assert text == engine.tokenizer.decode(tokens)
    assert text.strip()


async def test_a_stop_string_ends_the_text_before_it(engine: TorchEngine) -> None:
    prompt = chat(engine, "What is the capital of France?")
    free = ""
    async for out in engine.generate(GenerateRequest("free", prompt, SamplingParams(30, 0.0))):
        free += out.text
    assert "Paris" in free
    stopped, final = "", None
    params = SamplingParams(30, 0.0, stop=("Paris",))
    async for out in engine.generate(GenerateRequest("stop", prompt, params)):
        stopped += out.text
        final = out
    assert final is not None
    assert final.finish_reason is FinishReason.STOP
    assert final.stop_reason == "Paris"
    assert stopped == free[: free.index("Paris")]
