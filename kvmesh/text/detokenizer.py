"""Incremental detokenization and stop strings.

Decoding one token at a time is wrong for byte-level BPE (a character can span tokens) and for
SentencePiece (a token's leading space depends on its neighbour), so text is produced by decoding
a short window of tokens and emitting what grew past the previous window, holding back output
while it ends in an incomplete character.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvmesh.text.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"
_WINDOW = 5  # tokens of context re-decoded before the new ones


@dataclass(slots=True)
class IncrementalDetokenizer:
    tokenizer: Tokenizer
    stop: Sequence[str] = ()
    skip_special_tokens: bool = True
    _tokens: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0
    _text: str = ""  # everything decoded so far
    _emitted: int = 0  # characters of _text already returned
    stopped_on: str | None = None
    _held_back: int = 0  # characters kept back: a stop string may still be completing

    def __post_init__(self) -> None:
        self._held_back = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed new tokens; return the text they complete (less any stop string and after it)."""
        for token_id in token_ids:
            if self.stopped_on is not None:
                break
            self._tokens.append(token_id)
            self._text += self._step()
            self._check_stop()
        return self._take(final=self.stopped_on is not None)

    def flush(self) -> str:
        """The text still held back, at the end of the sequence."""
        if self.stopped_on is None:
            tail = self.tokenizer.decode(
                self._tokens[self._prefix_offset :], skip_special_tokens=self.skip_special_tokens
            )
            prefix = self.tokenizer.decode(
                self._tokens[self._prefix_offset : self._read_offset],
                skip_special_tokens=self.skip_special_tokens,
            )
            self._text += tail[len(prefix) :]
            self._read_offset = len(self._tokens)
        return self._take(final=True)

    def _step(self) -> str:
        skip = self.skip_special_tokens
        prefix = self.tokenizer.decode(
            self._tokens[self._prefix_offset : self._read_offset], skip_special_tokens=skip
        )
        full = self.tokenizer.decode(self._tokens[self._prefix_offset :], skip_special_tokens=skip)
        if len(full) <= len(prefix) or full.endswith(_INCOMPLETE):
            return ""
        new_text = full[len(prefix) :]
        self._read_offset = len(self._tokens)
        self._prefix_offset = max(self._read_offset - _WINDOW, 0)
        return new_text

    def _check_stop(self) -> None:
        if not self.stop:
            return
        # A stop string can only end inside text that is not yet emitted.
        start = max(self._emitted - self._held_back, 0)
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self._text.find(stop, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is not None:
            self._text = self._text[: best[0]]
            self.stopped_on = best[1]

    def _take(self, *, final: bool) -> str:
        end = len(self._text) if final else max(len(self._text) - self._held_back, self._emitted)
        out = self._text[self._emitted : end]
        self._emitted = end
        return out
