"""What was measured: one record per request, and the run's summary computed from them.

Latencies are taken at the client, from the moment a request is sent (after any wait for the
in-flight cap, which is recorded apart as `queued_s`):

- TTFT: until the first chunk that carries a token;
- ITL: per token — a chunk of k tokens that came g seconds after the previous one gives k gaps
  of g/k, so servers that stream one token per chunk and servers that batch are comparable.
  Where the protocol does not say how many tokens a chunk holds (OpenAI streams), the first
  chunk is taken to hold one and the usage's remaining completion tokens are spread evenly;
- E2E: until the stream's end.

Throughputs divide by the run's duration: from the first request sent to the last completed.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvmesh.bench.load.config import BenchConfig, Slo
from kvmesh.bench.load.speculation import SpeculationStats


@dataclass(slots=True)
class RequestRecord:
    index: int  # in order of sending
    session: int
    turn: int
    group: int | None
    prompt_len: int  # prompt tokens as generated (the server's count is `prompt_tokens`)
    max_tokens: int
    sent_s: float  # from the start of the run
    queued_s: float = 0.0  # waited for the in-flight cap before sending
    chunk_offsets_s: list[float] = field(default_factory=list)  # from sending, per chunk
    chunk_tokens: list[int] = field(default_factory=list)  # tokens per chunk (maybe estimated)
    e2e_s: float | None = None
    prompt_tokens: int | None = None  # as the server counted them (usage)
    completion_tokens: int = 0
    cached_tokens: int | None = None  # prompt tokens the server served from its prefix cache
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_offsets_s[0] if self.chunk_offsets_s else None

    @property
    def itls_s(self) -> list[float]:
        gaps: list[float] = []
        for i in range(1, len(self.chunk_offsets_s)):
            k = self.chunk_tokens[i]
            if k > 0:
                gaps += [(self.chunk_offsets_s[i] - self.chunk_offsets_s[i - 1]) / k] * k
        return gaps

    @property
    def mean_itl_s(self) -> float | None:
        itls = self.itls_s
        return sum(itls) / len(itls) if itls else None

    @property
    def hit_rate(self) -> float | None:
        if self.cached_tokens is None or not self.prompt_tokens:
            return None
        return self.cached_tokens / self.prompt_tokens

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out |= {"ttft_s": self.ttft_s, "mean_itl_s": self.mean_itl_s, "hit_rate": self.hit_rate}
        return out


def spread_tokens(num_chunks: int, total: int) -> list[int]:
    """Tokens per chunk when only the total is known: one in the first, the rest evenly."""
    if num_chunks <= 1:
        return [max(total, 1)] * num_chunks
    if total <= num_chunks:
        return [1] * num_chunks
    rest, extra = divmod(total - 1, num_chunks - 1)
    return [1] + [rest + (1 if i < extra else 0) for i in range(num_chunks - 1)]


@dataclass(frozen=True, slots=True)
class Stats:
    """Milliseconds."""

    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @staticmethod
    def of(values_s: Sequence[float]) -> Stats:
        if not values_s:
            return Stats(None, None, None, None)
        ms = np.asarray(values_s, dtype=float) * 1000
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        return Stats(float(ms.mean()), p50, p90, p99)


@dataclass(frozen=True, slots=True)
class Summary:
    num_requests: int  # finished, with or without error
    num_ok: int
    num_errors: int
    errors: dict[str, int]  # message -> count, most frequent first
    duration_s: float
    request_throughput: float  # successful requests per second
    output_throughput: float  # completion tokens per second
    total_token_throughput: float  # prompt + completion tokens per second
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None  # None: the server reported no cache hits at all
    prefix_hit_rate: float | None  # cached / prompt tokens, over requests that reported
    mean_request_hit_rate: float | None
    ttft_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    goodput: float | None  # requests per second meeting every SLO; None without SLOs
    good_fraction: float | None
    in_flight_cap_hits: int
    interrupted: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(
    records: Sequence[RequestRecord],
    *,
    duration_s: float,
    slo: Slo,
    in_flight_cap_hits: int = 0,
    interrupted: bool = False,
) -> Summary:
    ok = [r for r in records if r.ok]
    reporting = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens]
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    completion_tokens = sum(r.completion_tokens for r in ok)
    cached = sum(r.cached_tokens or 0 for r in reporting) if reporting else None
    reported_prompt = sum(r.prompt_tokens or 0 for r in reporting)
    per_second = 1 / duration_s if duration_s > 0 else 0.0
    good = [r for r in ok if meets(r, slo)] if slo.is_set else None
    hit_rates = [h for r in reporting if (h := r.hit_rate) is not None]
    errors = Counter(r.error for r in records if r.error is not None)
    return Summary(
        num_requests=len(records),
        num_ok=len(ok),
        num_errors=len(records) - len(ok),
        errors=dict(errors.most_common()),
        duration_s=duration_s,
        request_throughput=len(ok) * per_second,
        output_throughput=completion_tokens * per_second,
        total_token_throughput=(prompt_tokens + completion_tokens) * per_second,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=cached,
        prefix_hit_rate=cached / reported_prompt if cached is not None else None,
        mean_request_hit_rate=sum(hit_rates) / len(hit_rates) if hit_rates else None,
        ttft_ms=Stats.of([t for r in ok if (t := r.ttft_s) is not None]),
        itl_ms=Stats.of([g for r in ok for g in r.itls_s]),
        e2e_ms=Stats.of([r.e2e_s for r in ok if r.e2e_s is not None]),
        goodput=None if good is None else len(good) * per_second,
        good_fraction=None if good is None or not records else len(good) / len(records),
        in_flight_cap_hits=in_flight_cap_hits,
        interrupted=interrupted,
    )


def meets(record: RequestRecord, slo: Slo) -> bool:
    """Whether a request succeeded and met every SLO that is set.

    A measure a request does not have (no ITL for a one-token answer) cannot miss.
    """
    checks = (
        (slo.ttft_ms, record.ttft_s),
        (slo.itl_ms, record.mean_itl_s),
        (slo.e2e_ms, record.e2e_s),
    )
    return record.ok and all(
        limit_ms is None or value_s is None or value_s * 1000 <= limit_ms
        for limit_ms, value_s in checks
    )


@dataclass(slots=True)
class BenchResult:
    config: BenchConfig
    model: str
    target: str  # the target's description
    summary: Summary
    records: list[RequestRecord]
    speculation: SpeculationStats | None = None  # with --worker-metrics: the workers' drafts

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "target": self.target,
            "summary": self.summary.as_dict(),
            "speculation": None if self.speculation is None else self.speculation.as_dict(),
            "config": self.config.as_dict(),
            "requests": [r.as_dict() for r in self.records],
        }
