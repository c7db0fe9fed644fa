"""The load generator against a real HTTP server on 127.0.0.1 (a fake OpenAI completions API)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmesh.bench import load
from tests.integration.bench.fake_openai import FakeOpenAI, serve_in_thread

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
def url(fake: FakeOpenAI) -> Iterator[str]:
    with serve_in_thread(fake) as base:
        yield base


async def test_an_open_loop_shared_prefix_run(fake: FakeOpenAI, url: str, tmp_path: Path) -> None:
    workload = load.SharedPrefix(
        groups=3, prompts_per_group=4, system_prompt_len=32, question_len=4, output_len=6
    )
    config = load.BenchConfig(
        target=url, workload=workload, arrivals=load.OpenLoop(rate=200.0), seed=1
    )
    result = await load.run_async(config)

    s = result.summary
    assert (s.num_ok, s.num_errors) == (12, 0)
    assert (s.prompt_tokens, s.completion_tokens) == (12 * 36, 12 * 6)
    # Each group's first request misses; the fake caches whole prompts, so the other three
    # hit at least their group's 32 system-prompt tokens.
    assert 9 * 32 <= s.cached_tokens <= 9 * 36
    assert s.prefix_hit_rate == pytest.approx(s.cached_tokens / s.prompt_tokens)
    assert s.request_throughput > 0 and s.output_throughput > 0
    for r in result.records:
        assert r.ok and r.ttft_s is not None and r.e2e_s is not None
        assert 0 < r.ttft_s < r.e2e_s
        assert len(r.itls_s) == 5 and r.group in range(3)
    for body in fake.bodies:
        assert body["ignore_eos"] is True and body["temperature"] == 0
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["model"] == "fake-model" and body["max_tokens"] == 6
        assert all(100 <= t < 49_000 for t in body["prompt"])

    load.write_json(result, tmp_path / "run.json")
    written = json.loads((tmp_path / "run.json").read_text())
    assert len(written["requests"]) == 12 and written["config"]["workload"]["groups"] == 3
    plots = load.write_plots({"": result}, tmp_path / "plots")
    assert [p.name for p in plots] == ["latency_cdf.png", "throughput.png"]
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in plots)


async def test_a_closed_loop_keeps_concurrency_and_spreads_multi_token_chunks(
    fake: FakeOpenAI, url: str
) -> None:
    fake.tokens_per_chunk = 3  # chunks of 3, 3 and 1 tokens: the client only sees text
    workload = load.RandomPrompts(num_prompts=6, input_len=10, output_len=7)
    result = await load.run_async(
        load.BenchConfig(target=url, workload=workload, arrivals=load.ClosedLoop(2))
    )
    assert result.summary.num_ok == 6
    assert result.summary.completion_tokens == 42
    assert fake.most_in_flight <= 2
    for r in result.records:
        assert r.chunk_tokens == [1, 3, 3]  # usage says 7 tokens over 3 chunks
        assert len(r.itls_s) == 6


async def test_a_multi_turn_session_resends_its_history(fake: FakeOpenAI, url: str) -> None:
    workload = load.MultiTurn(sessions=1, turns=3, turn_len=5, output_len=4)
    result = await load.run_async(
        load.BenchConfig(target=url, workload=workload, arrivals=load.ClosedLoop(1))
    )
    assert result.summary.num_ok == 3
    prompts = [b["prompt"] for b in fake.bodies]
    assert [len(p) for p in prompts] == [5, 14, 23]  # + a stand-in answer and a new message
    assert prompts[1][:5] == prompts[0] and prompts[2][:14] == prompts[1]
    assert [r.cached_tokens for r in result.records] == [0, 5, 14]


async def test_server_errors_are_recorded_per_request(url: str) -> None:
    config = load.BenchConfig(
        target=url,
        model="no-such-model",
        workload=load.RandomPrompts(num_prompts=3, input_len=4, output_len=2),
        arrivals=load.OpenLoop(rate=float("inf")),
    )
    result = await load.run_async(config)
    assert result.summary.num_errors == 3
    assert result.summary.errors == {"HTTP 404: The model `no-such-model` does not exist.": 3}


async def test_an_unreachable_server_fails_before_any_load() -> None:
    with serve_in_thread(FakeOpenAI()) as gone:
        pass
    with pytest.raises(load.TargetUnreachableError, match="cannot reach"):
        await load.run_async(load.BenchConfig(target=gone))
