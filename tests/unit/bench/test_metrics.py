"""Per-request measures and the run summary: percentiles, throughputs, hit rate, goodput."""

from __future__ import annotations

import pytest

from kvmesh.bench.load.config import Slo
from kvmesh.bench.load.metrics import RequestRecord, Stats, meets, spread_tokens, summarize


def record(
    *,
    offsets: list[float],
    tokens: list[int] | None = None,
    e2e: float | None = None,
    prompt: int = 100,
    cached: int | None = None,
    error: str | None = None,
) -> RequestRecord:
    chunk_tokens = tokens if tokens is not None else [1] * len(offsets)
    return RequestRecord(
        index=0,
        session=0,
        turn=0,
        group=None,
        prompt_len=prompt,
        max_tokens=sum(chunk_tokens),
        sent_s=0.0,
        chunk_offsets_s=offsets,
        chunk_tokens=chunk_tokens,
        e2e_s=e2e if e2e is not None else (offsets[-1] if offsets else None),
        prompt_tokens=prompt,
        completion_tokens=sum(chunk_tokens),
        cached_tokens=cached,
        error=error,
    )


@pytest.mark.parametrize(
    ("chunks", "total", "expected"),
    [
        (0, 5, []),
        (1, 5, [5]),
        (4, 4, [1, 1, 1, 1]),
        (4, 2, [1, 1, 1, 1]),  # fewer tokens than chunks: one each
        (4, 8, [1, 3, 2, 2]),  # one in the first, 7 spread over 3
    ],
)
def test_spread_tokens(chunks: int, total: int, expected: list[int]) -> None:
    assert spread_tokens(chunks, total) == expected


def test_ttft_is_the_first_chunk_and_a_chunk_gap_is_split_over_its_tokens() -> None:
    r = record(offsets=[0.1, 0.2, 0.5], tokens=[1, 1, 3], e2e=0.6)
    assert r.ttft_s == 0.1
    assert r.itls_s == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert r.mean_itl_s == pytest.approx(0.1)
    assert record(offsets=[0.1]).itls_s == []
    assert record(offsets=[0.1]).mean_itl_s is None


def test_stats_are_milliseconds_with_linear_percentiles() -> None:
    stats = Stats.of([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats.mean == pytest.approx(50.5)
    assert stats.p50 == pytest.approx(50.5)
    assert stats.p90 == pytest.approx(90.1)
    assert stats.p99 == pytest.approx(99.01)
    assert Stats.of([]) == Stats(None, None, None, None)


def test_hit_rate_needs_a_reported_cache_count() -> None:
    assert record(offsets=[0.1], prompt=200, cached=50).hit_rate == 0.25
    assert record(offsets=[0.1], cached=None).hit_rate is None


def test_summary_counts_throughputs_and_hit_rates() -> None:
    records = [
        record(offsets=[0.1, 0.2], prompt=100, cached=0),  # 2 tokens
        record(offsets=[0.3, 0.4, 0.5, 0.6], prompt=100, cached=100),  # 4 tokens
        record(offsets=[], error="HTTP 500: boom"),
        record(offsets=[], error="HTTP 500: boom"),
    ]
    s = summarize(records, duration_s=2.0, slo=Slo())
    assert (s.num_requests, s.num_ok, s.num_errors) == (4, 2, 2)
    assert s.errors == {"HTTP 500: boom": 2}
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_throughput == pytest.approx(3.0)
    assert s.total_token_throughput == pytest.approx(103.0)
    assert (s.prompt_tokens, s.completion_tokens, s.cached_tokens) == (200, 6, 100)
    assert s.prefix_hit_rate == pytest.approx(0.5)
    assert s.mean_request_hit_rate == pytest.approx(0.5)
    assert s.ttft_ms.mean == pytest.approx(200.0)
    assert s.itl_ms.mean == pytest.approx(100.0)
    assert s.e2e_ms.p50 == pytest.approx(400.0)
    assert s.goodput is None and s.good_fraction is None


def test_a_server_without_cache_reports_has_no_hit_rate() -> None:
    s = summarize([record(offsets=[0.1, 0.2])], duration_s=1.0, slo=Slo())
    assert s.cached_tokens is None and s.prefix_hit_rate is None


def test_goodput_counts_requests_meeting_every_slo_that_is_set() -> None:
    fast = record(offsets=[0.05, 0.06, 0.07], e2e=0.08)  # TTFT 50 ms, ITL 10 ms, E2E 80 ms
    slow_start = record(offsets=[0.5, 0.51], e2e=0.52)
    slow_stream = record(offsets=[0.05, 0.25, 0.45], e2e=0.5)  # mean ITL 200 ms
    failed = record(offsets=[0.01], error="x")
    slo = Slo(ttft_ms=100, itl_ms=50)
    assert meets(fast, slo)
    assert not meets(slow_start, slo)
    assert not meets(slow_stream, slo)
    assert not meets(failed, slo)
    assert meets(slow_stream, Slo(ttft_ms=100))
    assert not meets(fast, Slo(e2e_ms=70))
    s = summarize([fast, slow_start, slow_stream, failed], duration_s=2.0, slo=slo)
    assert s.goodput == pytest.approx(0.5)
    assert s.good_fraction == pytest.approx(0.25)
