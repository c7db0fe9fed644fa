"""Draft tokens for speculative decoding; torch-free (the scheduler asks for them every step).

A `Drafter` proposes up to `max_tokens` tokens that may follow a decoding sequence; the model
then checks them all in one forward pass (`kvmesh.engine.verify`). The n-gram drafter is prompt
lookup (vLLM's `ngram` method): it finds the most recent earlier occurrence of the sequence's
last n tokens, n from `ngram_max` down to `ngram_min`, in its prompt and output so far, and
proposes the tokens that followed. It pays off where the output copies its input: code edits,
summaries that quote, reformatting.

The lookup is a dictionary per sequence from each n-gram to where its latest occurrence ends,
extended with each new token, so a step costs O(ngram_max - ngram_min + 1) per sequence instead
of a scan of the whole context. Tokens are only ever appended to a sequence (drafts are never
written into it, rejected or not), so the index never needs to forget anything.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kvmesh.engine.sequence import Sequence


class Drafter(Protocol):
    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        """Up to `max_tokens` (>= 1) tokens guessed to follow `seq`'s tokens; may be empty."""
        ...


@dataclass(slots=True)
class NgramIndex:
    """Where each n-gram (ngram_min <= n <= ngram_max) of a token list last ended.

    `ends[gram]` is the end (exclusive) of its latest occurrence among those ending at or before
    `indexed`; `indexed` trails the list by one, so the list's own suffix never finds itself.
    """

    ngram_min: int
    ngram_max: int
    ends: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0  # n-grams ending at positions <= this are in `ends`

    def propose(self, tokens: Seq[int], max_tokens: int) -> list[int]:
        """The up to `max_tokens` tokens that followed the latest earlier occurrence of the
        longest suffix of `tokens` (ngram_max down to ngram_min) seen before."""
        self._extend(tokens, len(tokens) - 1)
        for n in range(min(self.ngram_max, len(tokens) - 1), self.ngram_min - 1, -1):
            end = self.ends.get(tuple(tokens[len(tokens) - n :]))
            if end is not None:
                return list(tokens[end : end + max_tokens])
        return []

    def _extend(self, tokens: Seq[int], upto: int) -> None:
        for end in range(self.indexed + 1, upto + 1):
            for n in range(self.ngram_min, min(self.ngram_max, end) + 1):
                self.ends[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, upto)


def propose_ngram(
    tokens: Seq[int], max_tokens: int, *, ngram_max: int, ngram_min: int
) -> list[int]:
    """The n-gram draft by a plain backwards scan: what `NgramIndex` must agree with."""
    for n in range(min(ngram_max, len(tokens) - 1), ngram_min - 1, -1):
        suffix = list(tokens[len(tokens) - n :])
        for end in range(len(tokens) - 1, n - 1, -1):
            if list(tokens[end - n : end]) == suffix:
                return list(tokens[end : end + max_tokens])
    return []


@dataclass(frozen=True, slots=True)
class NgramDrafter:
    """Prompt lookup over each sequence's own tokens; the index lives on the sequence."""

    num_speculative_tokens: int
    ngram_max: int
    ngram_min: int = 1

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        index = seq.draft_index
        if not isinstance(index, NgramIndex):
            index = seq.draft_index = NgramIndex(self.ngram_min, self.ngram_max)
        return index.propose(seq.token_ids, min(max_tokens, self.num_speculative_tokens))
