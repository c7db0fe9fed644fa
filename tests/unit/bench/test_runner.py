"""The runner against an in-process target: sessions, caps, timeouts, failures, stopping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from kvmesh.bench.load import runner
from kvmesh.bench.load.arrivals import ClosedLoop, OpenLoop, arrival_offsets
from kvmesh.bench.load.config import BenchConfig
from kvmesh.bench.load.errors import RequestFailedError, TargetError, TargetUnreachableError
from kvmesh.bench.load.targets import Chunk, Prompt, Usage
from kvmesh.bench.load.workloads import MultiTurn, RandomPrompts, SharedPrefix

ANSWER_BASE = 60_000  # answer ids, outside the prompt range, so they can be told apart


@dataclass
class FakeTarget:
    """Answers `max_tokens` tokens, one per chunk, yielding to the loop between them."""

    description: str = "fake"
    models: list[str] = field(default_factory=lambda: ["fake-model"])
    fail_with: Callable[[list[int]], BaseException | None] = lambda prompt: None
    hang: bool = False
    on_generate: Callable[[], None] = lambda: None
    prompts: list[list[int]] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    closed: bool = False

    async def list_models(self) -> list[str]:
        if not self.models:
            raise TargetUnreachableError("cannot reach fake")
        return self.models

    async def generate(
        self, model: str, prompt: Prompt, max_tokens: int
    ) -> AsyncIterator[Chunk | Usage]:
        assert model == "fake-model" and not isinstance(prompt, str)
        self.prompts.append(list(prompt))
        self.on_generate()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hang:
                await asyncio.Event().wait()
            if (error := self.fail_with(list(prompt))) is not None:
                raise error
            for i in range(max_tokens):
                await asyncio.sleep(0)
                yield Chunk(1, (ANSWER_BASE + i,))
            yield Usage(len(prompt), max_tokens, len(prompt) // 2)
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        self.closed = True


@pytest.fixture
def target(monkeypatch: pytest.MonkeyPatch) -> FakeTarget:
    fake = FakeTarget()
    monkeypatch.setattr(runner, "open_target", lambda *args, **kwargs: fake)
    return fake


def config(**fields: object) -> BenchConfig:
    base: dict[str, object] = {
        "target": "http://fake:1",
        "workload": RandomPrompts(num_prompts=5, input_len=20, output_len=4),
        "arrivals": OpenLoop(rate=float("inf")),
    }
    return BenchConfig(**(base | fields))  # type: ignore[arg-type]


async def test_every_request_is_sent_timed_and_counted(target: FakeTarget) -> None:
    result = await runner.run_async(config())
    s = result.summary
    assert (s.num_ok, s.num_errors, s.completion_tokens, s.prompt_tokens) == (5, 0, 20, 100)
    assert s.prefix_hit_rate == pytest.approx(0.5)
    assert result.model == "fake-model" and target.closed
    assert [r.index for r in result.records] == list(range(5))
    for r in result.records:
        assert r.chunk_tokens == [1, 1, 1, 1] and len(r.itls_s) == 3
        assert r.ttft_s is not None and r.e2e_s is not None and 0 < r.ttft_s <= r.e2e_s


async def test_multi_turn_prompts_carry_the_history_and_answers(target: FakeTarget) -> None:
    workload = MultiTurn(sessions=3, turns=3, turn_len=5, output_len=2)
    result = await runner.run_async(config(workload=workload, arrivals=ClosedLoop(2)))
    assert result.summary.num_ok == 9
    assert target.most_in_flight <= 2
    answer = [ANSWER_BASE, ANSWER_BASE + 1]
    lengths = sorted(len(p) for p in target.prompts)
    assert lengths == [5, 5, 5, 12, 12, 12, 19, 19, 19]  # + 5 new tokens and a 2-token answer
    for later in target.prompts:
        if len(later) > 5:
            earlier = [p for p in target.prompts if len(p) == len(later) - 7]
            assert any(later[: len(p) + 2] == p + answer for p in earlier)


async def test_the_in_flight_cap_holds_requests_back_and_counts_it(target: FakeTarget) -> None:
    result = await runner.run_async(config(max_in_flight=1))
    assert result.summary.num_ok == 5
    assert target.most_in_flight == 1
    assert result.summary.in_flight_cap_hits == 4
    assert max(r.queued_s for r in result.records) > 0


async def test_failures_and_timeouts_are_recorded_and_the_run_goes_on(target: FakeTarget) -> None:
    calls = iter(range(100))

    def fail(prompt: list[int]) -> BaseException | None:
        n = next(calls)
        return (
            RequestFailedError("HTTP 503: busy")
            if n == 0
            else ValueError("bad")
            if n == 1
            else None
        )

    target.fail_with = fail
    result = await runner.run_async(config())
    assert result.summary.num_ok == 3
    assert result.summary.errors == {"HTTP 503: busy": 1, "ValueError: bad": 1}

    target.fail_with, target.hang = (lambda prompt: None), True
    result = await runner.run_async(config(request_timeout_s=0.05, num_requests=2))
    assert result.summary.errors == {"timed out after 0.05 s": 2}


async def test_stop_cancels_what_is_in_flight_and_marks_the_run(target: FakeTarget) -> None:
    stop = asyncio.Event()
    target.hang, target.on_generate = True, stop.set
    result = await runner.run_async(config(), stop=stop)
    assert result.summary.interrupted
    assert result.records == [] and target.in_flight == 0


async def test_no_new_sessions_start_after_the_duration(target: FakeTarget) -> None:
    arrivals = OpenLoop(rate=10.0)
    offsets = arrival_offsets(arrivals, 5, 0)
    duration = (offsets[2] + offsets[3]) / 2  # the third session starts, the fourth does not
    result = await runner.run_async(config(arrivals=arrivals, duration_s=duration))
    assert result.summary.num_requests == 3


async def test_the_model_is_the_first_listed_unless_given(target: FakeTarget) -> None:
    target.models = ["fake-model", "other"]
    assert (await runner.run_async(config(num_requests=1))).model == "fake-model"
    target.models = []
    with pytest.raises(TargetUnreachableError):
        await runner.run_async(config(num_requests=1, model="fake-model"))


async def test_a_server_without_a_model_list_needs_a_model_name(
    target: FakeTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_list() -> list[str]:
        raise TargetError("GET /v1/models: HTTP 404: not found")

    monkeypatch.setattr(target, "list_models", no_list)
    with pytest.raises(TargetError, match="404"):
        await runner.run_async(config(num_requests=1))
    result = await runner.run_async(config(num_requests=1, model="fake-model"))
    assert result.summary.num_ok == 1


async def test_shared_prefix_records_carry_their_group(target: FakeTarget) -> None:
    workload = SharedPrefix(
        groups=2, prompts_per_group=3, system_prompt_len=8, question_len=2, output_len=1
    )
    result = await runner.run_async(config(workload=workload))
    assert sorted(r.group for r in result.records) == [0, 0, 0, 1, 1, 1]
