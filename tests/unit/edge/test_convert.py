"""OpenAI bodies -> GenerateRequest, router messages -> OpenAI chunks and objects."""

from __future__ import annotations

import math
from typing import Any

import pytest

from kvmesh.api.v1 import common_pb2, generation_pb2
from services.edge import convert
from services.edge.errors import RouterError
from services.edge.openai_schema import ChatCompletionRequest, CompletionRequest, parse_body


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]} | fields
    return parse_body(body, ChatCompletionRequest)


def message(
    text: str,
    finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED,
    **fields: Any,
) -> generation_pb2.GenerateResponse:
    return generation_pb2.GenerateResponse(text=text, finish_reason=finish, **fields)


STOP, LENGTH = common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH


def test_max_completion_tokens_wins_and_default_applies() -> None:
    both = convert.chat_request(
        chat(max_tokens=5, max_completion_tokens=7), request_id="r", default_max_tokens=9
    )
    assert both.sampling.max_tokens == 7
    neither = convert.chat_request(chat(), request_id="r", default_max_tokens=9)
    assert neither.sampling.max_tokens == 9
    unset = convert.chat_request(chat(), request_id="r", default_max_tokens=None)
    assert not unset.sampling.HasField("max_tokens")


def test_completion_logprobs_zero_still_asks_for_logprobs() -> None:
    request = parse_body({"model": "m", "prompt": "x", "logprobs": 0}, CompletionRequest)
    sampling = convert.completion_request(request, request_id="r", default_max_tokens=None).sampling
    assert (sampling.logprobs, sampling.top_logprobs) == (True, 0)


def test_single_stop_string_becomes_a_list() -> None:
    request = convert.chat_request(chat(stop="END"), request_id="r", default_max_tokens=None)
    assert list(request.sampling.stop) == ["END"]


def test_chat_stream_chunks_and_response_agree() -> None:
    renderer = convert.ChatRenderer(request_id="r", model="m", include_usage=True)
    usage = common_pb2.Usage(prompt_tokens=3, completion_tokens=2, cached_prompt_tokens=2)
    chunks = renderer.add(message("Hel")) + renderer.add(message("lo", STOP, usage=usage))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None and c["id"] == "chatcmpl-r" for c in chunks)
    renderer.check_finished()
    assert renderer.usage_chunk()["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    assert renderer.usage_chunk()["choices"] == []
    response = renderer.response()
    assert response["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert response["usage"]["total_tokens"] == 5


def test_messages_after_the_finish_are_ignored() -> None:
    renderer = convert.CompletionRenderer(request_id="r", model="m")
    renderer.add(message("a", LENGTH))
    assert renderer.add(message("b")) == []
    assert renderer.response()["choices"][0] | {"logprobs": None} == {
        "index": 0,
        "text": "a",
        "logprobs": None,
        "finish_reason": "length",
    }


def test_a_stream_without_a_finish_reason_is_a_502() -> None:
    renderer = convert.ChatRenderer(request_id="req-7", model="m")
    renderer.add(message("x"))
    with pytest.raises(RouterError) as raised:
        renderer.check_finished()
    assert raised.value.status == 502
    assert "req-7" in raised.value.message


def test_an_aborted_generation_is_a_503() -> None:
    renderer = convert.ChatRenderer(request_id="req-7", model="m")
    with pytest.raises(RouterError) as raised:
        renderer.add(message("x", common_pb2.FINISH_REASON_ABORT))
    assert raised.value.status == 503
    assert "req-7" in raised.value.message


def test_infinite_logprobs_become_finite() -> None:
    renderer = convert.ChatRenderer(request_id="r", model="m", logprobs=[])
    lp = common_pb2.TokenLogprob(
        token_id=1, logprob=-math.inf, top=[common_pb2.TopLogprob(token_id=2, logprob=-math.inf)]
    )
    chunks = renderer.add(message("x", STOP, logprobs=[lp]))
    [entry] = chunks[1]["choices"][0]["logprobs"]["content"]
    assert entry["logprob"] == convert.MIN_LOGPROB
    assert entry["top_logprobs"][0]["logprob"] == convert.MIN_LOGPROB
    assert convert.sse(chunks[1]).startswith(b"data: {") and b"Infinity" not in convert.sse(
        chunks[1]
    )


def test_completion_text_offsets_follow_the_text() -> None:
    renderer = convert.CompletionRenderer(request_id="r", model="m", want_logprobs=True)
    for i, text in enumerate(["ab", "cde", "f"]):
        lp = common_pb2.TokenLogprob(token_id=i, logprob=-1.0)
        renderer.add(
            message(
                text, STOP if text == "f" else common_pb2.FINISH_REASON_UNSPECIFIED, logprobs=[lp]
            )
        )
    logprobs = renderer.response()["choices"][0]["logprobs"]
    assert logprobs["text_offset"] == [0, 2, 5]
    assert logprobs["tokens"] == ["token_id:0", "token_id:1", "token_id:2"]


def test_integral_floats_are_integers_and_a_tiny_top_p_stays_positive_in_32_bits() -> None:
    request = convert.chat_request(
        chat(max_tokens=5.0, top_p=1e-300, stop_token_ids=[7.0]),
        request_id="r",
        default_max_tokens=None,
    )
    assert request.sampling.max_tokens == 5 and list(request.sampling.stop_token_ids) == [7]
    assert request.sampling.top_p > 0  # 1e-300 would be 0.0 as a 32-bit float
