"""`resume_token_ids`: validation, and a stream seeded with tokens another router streamed."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kvmesh.api.v1 import common_pb2
from kvmesh.errors import InvalidRequestError
from kvmesh.sampling import SamplingParams
from kvmesh.text import Tokenizer
from services.router.servicer import validate_resumed
from services.router.stream import RequestStream

PIECES = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: " again"}


class PieceTokenizer:
    eos_token_id = None
    chat_template = None

    def __len__(self) -> int:
        return len(PIECES) + 1

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(PIECES[i] for i in ids)


def stream(max_tokens: int = 8, stop: tuple[str, ...] = ()) -> RequestStream:
    sampling = SamplingParams(max_tokens=max_tokens, stop=list(stop))
    return RequestStream("r", [1], sampling, Tokenizer(PieceTokenizer()), return_token_ids=True)


def streamed_text(s: RequestStream, tokens: list[int], finish_last: bool = True) -> str:
    text = ""
    for i, token in enumerate(tokens):
        last = finish_last and i == len(tokens) - 1
        finish = common_pb2.FINISH_REASON_LENGTH if last else common_pb2.FINISH_REASON_UNSPECIFIED
        response = s.add([token], [], finish, "")
        text += response.text if response is not None else ""
        if s.finished:
            break
    return text


def test_resumed_text_continues_where_the_other_router_left_off() -> None:
    whole = streamed_text(stream(), [1, 2, 3, 4, 5])
    first = stream()
    before = streamed_text(first, [1, 2, 3], finish_last=False)
    resumed = stream()
    assert resumed.resume([1, 2, 3]) is None
    after = streamed_text(resumed, [4, 5])
    assert before + after == whole == "Hello world!"
    assert resumed.generated == [1, 2, 3, 4, 5]
    assert resumed.usage().completion_tokens == 5


def test_a_stop_string_across_the_boundary_is_found() -> None:
    whole = streamed_text(stream(stop=("world",)), [1, 2, 3, 4, 5])
    before = streamed_text(stream(stop=("world",)), [1, 2, 3], finish_last=False)
    assert before == "Hello"  # " wor" is held back: it may start the stop string
    resumed = stream(stop=("world",))
    assert resumed.resume([1, 2, 3]) is None
    response = resumed.add([4], [], common_pb2.FINISH_REASON_UNSPECIFIED, "")
    assert response is not None
    assert response.finish_reason == common_pb2.FINISH_REASON_STOP
    assert response.stop_reason == "world"
    assert before + response.text == whole == "Hello "
    assert response.usage.completion_tokens == 4


def test_text_held_back_for_a_stop_string_that_does_not_come_is_sent() -> None:
    first = stream(stop=("world!",))
    before = streamed_text(first, [1, 2, 3], finish_last=False)  # holds back up to 5 chars
    resumed = stream(stop=("world!",))
    resumed.resume([1, 2, 3])
    after = streamed_text(resumed, [6])
    assert before + after == "Hello wor again"


def test_resumed_tokens_that_already_stop_finish_at_once() -> None:
    resumed = stream(stop=("lo",))
    last = resumed.resume([1, 2, 3])
    assert last is not None and last.finish_reason == common_pb2.FINISH_REASON_STOP
    assert resumed.finished


@pytest.mark.parametrize(
    ("resumed", "message"),
    [
        ([1, 7], r"resume_token_ids has token ids outside the vocabulary \[0, 7\): \[7\]"),
        ([1, 2, 3, 4], r"resume_token_ids has 4 tokens; it must be shorter than max_tokens \(4\)"),
    ],
)
def test_bad_resumed_tokens_are_refused(resumed: list[int], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        validate_resumed(resumed, SamplingParams(max_tokens=4), vocab_size=7)
    validate_resumed(resumed[:3], SamplingParams(max_tokens=4), vocab_size=8)
