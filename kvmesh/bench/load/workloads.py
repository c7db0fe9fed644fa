"""Workloads: deterministic token-id prompts shaped like the traffic kvmesh must serve.

Every workload is a list of sessions; a session is a sequence of turns sent one after the other
(turn k+1 only once turn k has completed), and each turn's prompt is the session's context so far
plus the turn's new tokens. One-turn sessions are independent requests. That one shape covers:

- `shared-prefix` (SGLang bench_serving's "generated-shared-prefix", same defaults): groups of
  requests that share a long system prompt and differ in a short question; the requests of all
  groups are shuffled together, so a router must find each group's cached prefix on its own;
- `multi-turn`: chats whose every turn resends the whole history, answers included;
- `code-edit`: a file-sized prompt per session that grows by a small edit with each request;
- `random`: independent prompts of random lengths, with nothing shared (a cache-miss baseline).

Token ids are drawn from `TokenRange` (default 100..49000: below every special token and inside
SmolLM2's 49152-token vocabulary, so the prompts are valid for the default model and for larger
vocabularies alike). The same seed gives the same sessions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

WorkloadT = TypeVar("WorkloadT", bound="Workload")


@dataclass(frozen=True, slots=True)
class TokenRange:
    """Prompt token ids are drawn uniformly from [low, high)."""

    low: int = 100
    high: int = 49_000

    def draw(self, rng: np.random.Generator, n: int) -> tuple[int, ...]:
        return tuple(int(t) for t in rng.integers(self.low, self.high, size=n))


@dataclass(frozen=True, slots=True)
class Turn:
    new_tokens: tuple[int, ...]  # appended to the session's context to make this turn's prompt
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Session:
    session_id: int
    turns: tuple[Turn, ...]
    group: int | None = None  # shared-prefix: which system prompt the request carries
    include_answers: bool = False  # the answer joins the context before the next turn


class Workload(Protocol):
    """What the runner needs from a workload spec: a dataclass with a name that makes sessions."""

    name: ClassVar[str]
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def make_sessions(self, rng: np.random.Generator, tokens: TokenRange) -> list[Session]: ...


@dataclass(frozen=True, slots=True)
class SharedPrefix:
    name: ClassVar[str] = "shared-prefix"
    groups: int = 64
    prompts_per_group: int = 16
    system_prompt_len: int = 2048
    question_len: int = 128
    output_len: int = 256
    zipf: float = 0.0  # 0: every group gets prompts_per_group; s > 0: group k's share ~ 1/k^s

    def make_sessions(self, rng: np.random.Generator, tokens: TokenRange) -> list[Session]:
        systems = [tokens.draw(rng, self.system_prompt_len) for _ in range(self.groups)]
        total = self.groups * self.prompts_per_group
        if self.zipf > 0:  # the same number of requests, skewed towards the first groups
            weights = 1.0 / np.arange(1, self.groups + 1) ** self.zipf
            groups = [
                int(g) for g in rng.choice(self.groups, size=total, p=weights / weights.sum())
            ]
        else:
            groups = [g for g in range(self.groups) for _ in range(self.prompts_per_group)]
        requests = [(g, systems[g] + tokens.draw(rng, self.question_len)) for g in sorted(groups)]
        order = rng.permutation(len(requests))
        return [
            Session(i, (Turn(requests[j][1], self.output_len),), group=requests[j][0])
            for i, j in enumerate(order)
        ]


@dataclass(frozen=True, slots=True)
class MultiTurn:
    name: ClassVar[str] = "multi-turn"
    sessions: int = 16
    turns: int = 4
    turn_len: int = 128
    output_len: int = 128

    def make_sessions(self, rng: np.random.Generator, tokens: TokenRange) -> list[Session]:
        return [
            Session(
                s,
                tuple(
                    Turn(tokens.draw(rng, self.turn_len), self.output_len)
                    for _ in range(self.turns)
                ),
                include_answers=True,
            )
            for s in range(self.sessions)
        ]


@dataclass(frozen=True, slots=True)
class CodeEdit:
    name: ClassVar[str] = "code-edit"
    sessions: int = 8
    turns: int = 8  # requests per session
    file_len: int = 2048
    edit_len: int = 16
    output_len: int = 64

    def make_sessions(self, rng: np.random.Generator, tokens: TokenRange) -> list[Session]:
        out: list[Session] = []
        for s in range(self.sessions):
            first = Turn(tokens.draw(rng, self.file_len + self.edit_len), self.output_len)
            edits = [
                Turn(tokens.draw(rng, self.edit_len), self.output_len)
                for _ in range(self.turns - 1)
            ]
            out.append(Session(s, (first, *edits)))
        return out


@dataclass(frozen=True, slots=True)
class RandomPrompts:
    """Lengths uniform in [len·(1−r), len·(1+r)] (at least 1), r = range_ratio in [0, 1]."""

    name: ClassVar[str] = "random"
    num_prompts: int = 100
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0

    def make_sessions(self, rng: np.random.Generator, tokens: TokenRange) -> list[Session]:
        out: list[Session] = []
        for s in range(self.num_prompts):
            prompt_len = _around(rng, self.input_len, self.range_ratio)
            output_len = _around(rng, self.output_len, self.range_ratio)
            out.append(Session(s, (Turn(tokens.draw(rng, prompt_len), output_len),)))
        return out


WORKLOADS: dict[str, type[Workload]] = {
    w.name: w for w in (SharedPrefix, MultiTurn, CodeEdit, RandomPrompts)
}


def _around(rng: np.random.Generator, length: int, ratio: float) -> int:
    low, high = round(length * (1 - ratio)), round(length * (1 + ratio))
    return max(1, int(rng.integers(low, high + 1)))


def scaled(workload: WorkloadT, factor: float) -> WorkloadT:
    """Multiply every length and count by `factor` (at least 1 each): the same shape, smaller.

    Ratios are left alone. Used to fit the published defaults to a small machine.
    """
    if factor == 1:
        return workload
    changes = {
        f.name: max(1, round(getattr(workload, f.name) * factor))
        for f in dataclasses.fields(workload)
        if isinstance(getattr(workload, f.name), int)
    }
    return dataclasses.replace(workload, **changes)


def build(workload: Workload, seed: int, tokens: TokenRange) -> list[Session]:
    return workload.make_sessions(np.random.default_rng(seed), tokens)


def truncate(sessions: Sequence[Session], num_requests: int) -> list[Session]:
    """The first `num_requests` turns, session by session in order (a run's request bound)."""
    out: list[Session] = []
    left = num_requests
    for session in sessions:
        if left <= 0:
            break
        out.append(dataclasses.replace(session, turns=session.turns[:left]))
        left -= len(out[-1].turns)
    return out


def stand_in_answer(
    seed: int, session: Session, turn: int, n: int, tokens: TokenRange
) -> list[int]:
    """Tokens in place of an answer the server did not return as ids (OpenAI text streams).

    The same length keeps the context growing as the real conversation would; a server's cache
    cannot match these tokens, so multi-turn hit rates over HTTP are a lower bound.
    """
    rng = np.random.default_rng((seed, session.session_id, turn))
    return list(tokens.draw(rng, n))
