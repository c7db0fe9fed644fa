"""N-gram (prompt lookup) drafts: the incremental index against a plain scan, and the limits."""

from __future__ import annotations

import random

import pytest

from kvmesh.engine.drafts import NgramDrafter, NgramIndex, propose_ngram
from kvmesh.engine.sequence import Sequence
from kvmesh.sampling import SamplingParams


def test_the_latest_earlier_occurrence_of_the_longest_suffix_gives_the_draft() -> None:
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # [2, 3] last occurred before the suffix at 6..7, followed by 7, 8, 5.
    assert propose_ngram(tokens, 3, ngram_max=3, ngram_min=1) == [7, 8, 5]
    # With a longer suffix allowed, [5, 2, 3] never occurred before: [2, 3] still decides.
    assert propose_ngram(tokens, 2, ngram_max=4, ngram_min=2) == [7, 8]
    # A continuation may run into the suffix itself (periodic text): it stops at the end.
    assert propose_ngram([4, 4, 4], 5, ngram_max=2, ngram_min=1) == [4]
    assert propose_ngram([1, 2, 3, 1, 2], 5, ngram_max=2, ngram_min=1) == [3, 1, 2]


def test_no_earlier_occurrence_no_draft() -> None:
    assert propose_ngram([1, 2, 3, 4], 3, ngram_max=3, ngram_min=1) == []
    assert propose_ngram([5], 3, ngram_max=3, ngram_min=1) == []
    # ngram_min 2: a single repeated token is not enough.
    assert propose_ngram([1, 2, 3, 1], 3, ngram_max=3, ngram_min=2) == []
    assert NgramIndex(2, 3).propose([1, 2, 3, 1], 3) == []


@pytest.mark.parametrize(("ngram_min", "ngram_max"), [(1, 1), (1, 3), (2, 4), (3, 5)])
def test_the_incremental_index_agrees_with_a_scan_as_tokens_arrive(
    ngram_min: int, ngram_max: int
) -> None:
    rng = random.Random(ngram_min * 10 + ngram_max)
    for _ in range(20):
        tokens = [rng.randrange(6) for _ in range(rng.randint(1, 10))]
        index = NgramIndex(ngram_min, ngram_max)
        for _ in range(60):
            k = rng.randint(1, 6)
            expected = propose_ngram(tokens, k, ngram_max=ngram_max, ngram_min=ngram_min)
            assert index.propose(tokens, k) == expected, tokens
            tokens += [rng.randrange(6) for _ in range(rng.randint(1, 3))]


def test_the_drafter_keeps_its_index_on_the_sequence_and_caps_the_draft() -> None:
    seq = Sequence("r", [1, 2, 3, 4, 5, 6, 1, 2], 8, SamplingParams(), sampler=None)
    drafter = NgramDrafter(num_speculative_tokens=3, ngram_max=3)
    assert drafter.propose(seq, 10) == [3, 4, 5]  # num_speculative_tokens
    assert drafter.propose(seq, 2) == [3, 4]  # the caller's room
    assert isinstance(seq.draft_index, NgramIndex)
    seq.token_ids += [3, 4]
    assert drafter.propose(seq, 10) == [5, 6, 1]
