"""Workloads: the same seed gives the same prompts, and each workload has its documented shape."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kvmesh.bench.load.workloads import (
    CodeEdit,
    MultiTurn,
    RandomPrompts,
    SharedPrefix,
    TokenRange,
    Workload,
    build,
    scaled,
    stand_in_answer,
    truncate,
)

TOKENS = TokenRange()
SMALL_GSP = SharedPrefix(
    groups=4, prompts_per_group=5, system_prompt_len=64, question_len=8, output_len=3
)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_shared_prefix_defaults_are_sglangs() -> None:
    # SGLang bench_serving's generated-shared-prefix defaults (--gsp-*).
    assert SharedPrefix() == SharedPrefix(
        groups=64, prompts_per_group=16, system_prompt_len=2048, question_len=128, output_len=256
    )


@pytest.mark.parametrize(
    "workload",
    [SMALL_GSP, MultiTurn(sessions=3, turns=2), CodeEdit(sessions=2, turns=3), RandomPrompts(5)],
)
def test_the_same_seed_gives_the_same_sessions(workload: Workload) -> None:
    assert build(workload, 7, TOKENS) == build(workload, 7, TOKENS)
    assert build(workload, 7, TOKENS) != build(workload, 8, TOKENS)


def test_shared_prefix_groups_share_exactly_their_system_prompt() -> None:
    sessions = build(SMALL_GSP, 0, TOKENS)
    assert len(sessions) == 4 * 5
    assert all(len(s.turns) == 1 and s.turns[0].max_tokens == 3 for s in sessions)
    prompts = [(s.group, s.turns[0].new_tokens) for s in sessions]
    assert all(len(p) == 64 + 8 for _, p in prompts)
    for group_a, a in prompts:
        for group_b, b in prompts:
            if a is b:
                continue
            shared = common_prefix(a, b)
            assert shared == 64 if group_a == group_b else shared < 64


def test_shared_prefix_requests_are_shuffled_across_groups() -> None:
    groups = [s.group for s in build(SMALL_GSP, 0, TOKENS)]
    assert sorted(groups) == [g for g in range(4) for _ in range(5)]
    assert groups != sorted(groups)


def test_token_ids_stay_in_the_range() -> None:
    narrow = TokenRange(100, 110)
    ids = {t for s in build(SMALL_GSP, 0, narrow) for t in s.turns[0].new_tokens}
    assert ids <= set(range(100, 110))


def test_multi_turn_sessions_add_a_user_message_per_turn_and_keep_answers() -> None:
    sessions = build(MultiTurn(sessions=3, turns=4, turn_len=10, output_len=5), 0, TOKENS)
    assert [s.session_id for s in sessions] == [0, 1, 2]
    for s in sessions:
        assert s.include_answers
        assert [len(t.new_tokens) for t in s.turns] == [10] * 4
        assert {t.max_tokens for t in s.turns} == {5}


def test_code_edit_sessions_start_with_a_file_then_grow_by_edits() -> None:
    sessions = build(CodeEdit(sessions=2, turns=3, file_len=100, edit_len=4), 0, TOKENS)
    for s in sessions:
        assert not s.include_answers
        assert [len(t.new_tokens) for t in s.turns] == [104, 4, 4]


def test_random_prompt_lengths_stay_within_the_range_ratio() -> None:
    workload = RandomPrompts(num_prompts=200, input_len=100, output_len=10, range_ratio=0.5)
    sessions = build(workload, 0, TOKENS)
    lengths = [len(s.turns[0].new_tokens) for s in sessions]
    outputs = [s.turns[0].max_tokens for s in sessions]
    assert min(lengths) >= 50 and max(lengths) <= 150 and len(set(lengths)) > 20
    assert min(outputs) >= 5 and max(outputs) <= 15
    fixed = build(RandomPrompts(num_prompts=5, input_len=30), 0, TOKENS)
    assert {len(s.turns[0].new_tokens) for s in fixed} == {30}


def test_scale_multiplies_lengths_and_counts_but_keeps_at_least_one() -> None:
    assert scaled(SharedPrefix(), 0.125) == SharedPrefix(
        groups=8, prompts_per_group=2, system_prompt_len=256, question_len=16, output_len=32
    )
    assert scaled(RandomPrompts(input_len=10, range_ratio=0.3), 0.01) == RandomPrompts(
        num_prompts=1, input_len=1, output_len=1, range_ratio=0.3
    )


def test_truncate_keeps_the_first_turns_in_session_order() -> None:
    sessions = build(MultiTurn(sessions=3, turns=4), 0, TOKENS)
    kept = truncate(sessions, 6)
    assert [len(s.turns) for s in kept] == [4, 2]
    assert kept[1].turns == sessions[1].turns[:2]
    assert truncate(sessions, 100) == sessions


def test_stand_in_answers_are_deterministic_and_sized() -> None:
    session = build(MultiTurn(sessions=1), 0, TOKENS)[0]
    answer = stand_in_answer(3, session, 1, 17, TOKENS)
    assert len(answer) == 17
    assert answer == stand_in_answer(3, session, 1, 17, TOKENS)
    assert answer != stand_in_answer(3, session, 2, 17, TOKENS)


def test_zipf_popularity_skews_groups_and_keeps_the_request_count() -> None:
    import numpy as np

    from kvmesh.bench.load.workloads import SharedPrefix, TokenRange

    spec = SharedPrefix(
        groups=8, prompts_per_group=16, system_prompt_len=8, question_len=2, zipf=1.2
    )
    sessions = spec.make_sessions(np.random.default_rng(0), TokenRange())
    assert len(sessions) == 8 * 16
    counts = [sum(1 for s in sessions if s.group == g) for g in range(8)]
    assert counts[0] > 2 * 16  # the most popular group takes far more than its uniform share
    assert counts[0] > counts[7]
    uniform = SharedPrefix(groups=8, prompts_per_group=16, system_prompt_len=8, question_len=2)
    sessions = uniform.make_sessions(np.random.default_rng(0), TokenRange())
    assert [sum(1 for s in sessions if s.group == g) for g in range(8)] == [16] * 8
