from collections.abc import Sequence

import pytest

from kvmesh.text.detokenizer import IncrementalDetokenizer
from kvmesh.text.tokenizer import Tokenizer

# Byte-level pieces: "é" is split across two tokens, as byte-level BPE does.
PIECES = {
    1: b"Hel",
    2: b"lo",
    3: b" w",
    4: b"orld",
    5: b"\xc3",
    6: b"\xa9",
    7: b"!",
    8: b"\n",
    9: b"END",
}


class ByteTokenizer:
    def __len__(self) -> int:
        return len(PIECES)

    eos_token_id = None
    chat_template = None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def stream(ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(Tokenizer(ByteTokenizer()), stop=stop)
    pieces = [detok.add([i]) for i in ids]
    pieces.append(detok.flush())
    return pieces, detok


def test_streamed_text_equals_the_full_decode() -> None:
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    pieces, _ = stream(ids)
    assert "".join(pieces) == ByteTokenizer().decode(ids)


def test_an_incomplete_character_is_held_back() -> None:
    pieces, _ = stream([1, 5, 6, 7])
    assert pieces[:4] == ["Hel", "", "é", "!"]


def test_stop_string_cuts_the_text_and_is_reported() -> None:
    pieces, detok = stream([1, 2, 3, 4, 9, 1, 2], stop=("END",))
    assert "".join(pieces) == "Hello world"
    assert detok.stopped_on == "END"


def test_stop_string_spanning_tokens_is_never_emitted() -> None:
    pieces, detok = stream([1, 2, 3, 4], stop=("o wor",))
    assert "".join(pieces) == "Hell"
    assert all("o w" not in p for p in pieces)
    assert detok.stopped_on == "o wor"


@pytest.mark.parametrize("stop", [("xyz",), ("Hello world!!",)])
def test_text_held_for_a_stop_string_that_never_completes_is_flushed(stop: tuple[str, ...]) -> None:
    pieces, detok = stream([1, 2, 3, 4, 7], stop=stop)
    assert "".join(pieces) == "Hello world!"
    assert detok.stopped_on is None
