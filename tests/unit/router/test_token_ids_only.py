"""A model without a tokenizer (a dummy at a shape no tokenizer here has) is served as ids."""

from __future__ import annotations

from typing import Any

import pytest

from kvmesh.api.v1 import common_pb2, generation_pb2
from kvmesh.errors import InvalidRequestError
from kvmesh.sampling import SamplingParams
from services.router.args import RouterConfig
from services.router.servicer import GenerationServicer
from services.router.stream import RequestStream


def _servicer() -> GenerationServicer:
    unused: Any = None  # _tokenize reaches neither the pool nor the planner
    return GenerationServicer(RouterConfig(), unused, None, "dummy:llama-3.1-8b", unused)


def test_token_ids_pass_through_without_a_tokenizer() -> None:
    request = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[5, 6, 7]))
    assert _servicer()._tokenize(request) == [5, 6, 7]


@pytest.mark.parametrize(
    "request_",
    [
        generation_pb2.GenerateRequest(text="hello"),
        generation_pb2.GenerateRequest(
            chat=generation_pb2.ChatMessages(messages=[generation_pb2.ChatMessage(content="hi")])
        ),
    ],
    ids=["text", "chat"],
)
def test_text_and_chat_are_rejected_with_a_reason(request_: generation_pb2.GenerateRequest) -> None:
    with pytest.raises(InvalidRequestError, match="has no tokenizer here: send token_ids"):
        _servicer()._tokenize(request_)


def test_stream_carries_token_ids_and_empty_text() -> None:
    stream = RequestStream("r", [1, 2], SamplingParams(max_tokens=2), None, return_token_ids=True)
    first = stream.add([9], [common_pb2.TokenLogprob(token_id=9, logprob=-0.5)], 0, "")
    assert first is not None
    assert list(first.token_ids) == [9]
    assert first.text == ""
    assert first.logprobs[0].token_id == 9
    last = stream.add([10], [], common_pb2.FINISH_REASON_LENGTH, "")
    assert last is not None
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 2
