"""The official OpenAI client against the edge: chat, completions, streaming, usage, models."""

from __future__ import annotations

import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.edge.fake_router import FIRST_TOKEN_ID, MODEL, FakeRouter

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "the quick brown fox"}]


async def test_chat_completion(openai_client: AsyncOpenAI, fake: FakeRouter) -> None:
    completion = await openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "developer", "content": "be brief"}, *USER],
        max_completion_tokens=10,
        temperature=0.5,
        top_p=0.9,
        seed=-1,
        stop=["\n\n"],
        extra_body={"top_k": 5, "ignore_eos": True, "stop_token_ids": [7]},
    )
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "the quick brown fox"
    assert choice.finish_reason == "stop"
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 4)
    assert completion.usage.total_tokens == 8
    [request] = fake.requests
    assert [(m.role, m.content) for m in request.chat.messages] == [
        ("system", "be brief"),
        ("user", "the quick brown fox"),
    ]
    sampling = request.sampling
    assert sampling.max_tokens == 10
    assert sampling.temperature == pytest.approx(0.5)
    assert sampling.top_p == pytest.approx(0.9)
    assert sampling.seed == 2**64 - 1  # int64 -1 as the proto's uint64
    assert list(sampling.stop) == ["\n\n"]
    assert (sampling.top_k, sampling.ignore_eos, list(sampling.stop_token_ids)) == (5, True, [7])
    assert not sampling.logprobs


async def test_chat_unset_sampling_fields_stay_unset(
    openai_client: AsyncOpenAI, fake: FakeRouter
) -> None:
    await openai_client.chat.completions.create(model=MODEL, messages=USER)
    sampling = fake.requests[0].sampling
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        assert not sampling.HasField(name), name


async def test_chat_content_parts_are_joined(openai_client: AsyncOpenAI, fake: FakeRouter) -> None:
    message: ChatCompletionMessageParam = {
        "role": "user",
        "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}],
    }
    completion = await openai_client.chat.completions.create(model=MODEL, messages=[message])
    assert completion.choices[0].message.content == "one two"
    assert fake.requests[0].chat.messages[0].content == "one two"


async def test_chat_length_finish(openai_client: AsyncOpenAI) -> None:
    completion = await openai_client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=2
    )
    assert completion.choices[0].message.content == "the quick"
    assert completion.choices[0].finish_reason == "length"


async def test_chat_stream_with_usage(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "the quick brown fox"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 8
    assert chunks[-1].usage.prompt_tokens_details is not None
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 1


async def test_chat_stream_without_usage(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(model=MODEL, messages=USER, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(c.choices and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_chat_logprobs(openai_client: AsyncOpenAI, fake: FakeRouter) -> None:
    completion = await openai_client.chat.completions.create(
        model=MODEL, messages=USER, logprobs=True, top_logprobs=2
    )
    assert (fake.requests[0].sampling.logprobs, fake.requests[0].sampling.top_logprobs) == (True, 2)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert len(logprobs.content) == 4
    first = logprobs.content[0]
    assert first.token == f"token_id:{FIRST_TOKEN_ID}"
    assert first.logprob == pytest.approx(-0.25)
    assert first.bytes is None
    assert [t.token for t in first.top_logprobs] == [
        f"token_id:{FIRST_TOKEN_ID}",
        f"token_id:{FIRST_TOKEN_ID + 1}",
    ]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx([-0.25, -1.25])


async def test_chat_stream_logprobs(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model=MODEL, messages=USER, logprobs=True, stream=True
    )
    tokens = [
        entry.token
        async for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content or ()
    ]
    assert tokens == [f"token_id:{FIRST_TOKEN_ID + i}" for i in range(4)]


async def test_completion(openai_client: AsyncOpenAI, fake: FakeRouter) -> None:
    completion = await openai_client.completions.create(
        model=MODEL, prompt="a b c", max_tokens=2, logprobs=1
    )
    choice = completion.choices[0]
    assert completion.id.startswith("cmpl-")
    assert completion.object == "text_completion"
    assert (choice.text, choice.finish_reason) == ("a b", "length")
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 2)
    assert choice.logprobs is not None
    assert choice.logprobs.tokens == [
        f"token_id:{FIRST_TOKEN_ID}",
        f"token_id:{FIRST_TOKEN_ID + 1}",
    ]
    assert choice.logprobs.token_logprobs == pytest.approx([-0.25, -0.5])
    assert choice.logprobs.top_logprobs == [
        {f"token_id:{FIRST_TOKEN_ID}": -0.25},
        {f"token_id:{FIRST_TOKEN_ID + 1}": -0.5},
    ]
    assert choice.logprobs.text_offset == [0, 1]
    [request] = fake.requests
    assert request.text == "a b c"
    assert (request.sampling.logprobs, request.sampling.top_logprobs) == (True, 1)


async def test_completion_of_token_ids(openai_client: AsyncOpenAI, fake: FakeRouter) -> None:
    completion = await openai_client.completions.create(model=MODEL, prompt=[5, 6, 7])
    assert completion.choices[0].text == "5 6 7"
    assert list(fake.requests[0].token_ids.ids) == [5, 6, 7]
    await openai_client.completions.create(model=MODEL, prompt=[[8, 9]])  # a batch of one
    assert list(fake.requests[1].token_ids.ids) == [8, 9]


async def test_completion_stream_with_usage(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.completions.create(
        model=MODEL,
        prompt="one two three",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "one two three"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


async def test_models(openai_client: AsyncOpenAI) -> None:
    models = [m async for m in openai_client.models.list()]
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "kvmesh"
    model = await openai_client.models.retrieve(MODEL)
    assert model.id == MODEL
