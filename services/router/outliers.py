"""Outlier ejection and a retry budget, as Envoy's outlier detection and retry budgets do.

A worker is **ejected** (the router sends it no new requests) when:

- it fails `consecutive_failures` calls in a row (Envoy's consecutive_5xx); or, evaluated every
  `interval_s` over the calls since the last evaluation, among the workers of its tier with at
  least `min_requests` calls each, at least `min_hosts` of them:
- its **success rate** is below the mean minus `stdev_factor` standard deviations (Envoy's
  success_rate ejection); or
- its **latency** (mean seconds per call) is above `latency_factor` times the median of its
  peers'.

An ejection lasts `base_ejection_s` times 2^(n-1) for a worker's n-th ejection in a row, at
most `max_ejection_s`; n falls back by one for each interval the worker goes without one. At
most `max_ejected_share` of a tier is ejected at once, but always one may be (Envoy's
max_ejection_percent). A tier whose every worker is ejected is used anyway (`WorkerPool`).

The **retry budget** limits retries (prefill retries and decode migrations) in flight to
`budget_share` of the requests in flight, but always allows `min_retries` (Envoy's
retry_budget: budget_percent, min_retry_concurrency), so that a failing tier is not hammered
by retries of everything sent to it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from kvmesh.telemetry import metrics

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    consecutive_failures: int = 3
    interval_s: float = 10.0
    base_ejection_s: float = 5.0
    max_ejection_s: float = 300.0
    max_ejected_share: float = 0.5
    min_hosts: int = 3
    min_requests: int = 10
    stdev_factor: float = 1.9
    latency_factor: float = 3.0


@dataclass(slots=True)
class _Host:
    tier: str
    consecutive: int = 0
    calls: int = 0
    failures: int = 0
    seconds: float = 0.0
    ejected_until: float = -math.inf
    times_ejected: int = 0  # in a row: the next ejection lasts 2^times_ejected base times
    ejected_this_interval: bool = False


@dataclass(slots=True)
class OutlierDetector:
    config: OutlierConfig = field(default_factory=OutlierConfig)
    clock: Callable[[], float] = time.monotonic
    _hosts: dict[str, _Host] = field(default_factory=dict)
    _next_evaluation: float | None = None

    def _now(self) -> float:
        return self.clock()

    def is_ejected(self, worker_id: str) -> bool:
        host = self._hosts.get(worker_id)
        return host is not None and self._now() < host.ejected_until

    def record(self, worker_id: str, tier: str, *, ok: bool, seconds: float = 0.0) -> None:
        """One call's outcome (and how long it took, for the latency rule)."""
        now = self._now()
        host = self._hosts.setdefault(worker_id, _Host(tier))
        host.calls += 1
        host.seconds += seconds
        if ok:
            host.consecutive = 0
        else:
            host.failures += 1
            host.consecutive += 1
            if host.consecutive >= self.config.consecutive_failures:
                self._eject(worker_id, host, now, f"{host.consecutive} consecutive failures")
        self._maybe_evaluate(now)

    def forget(self, worker_id: str) -> None:
        """A worker that left discovery."""
        self._hosts.pop(worker_id, None)

    def ejected(self, tier: str) -> list[str]:
        now = self._now()
        return [w for w, h in self._hosts.items() if h.tier == tier and now < h.ejected_until]

    # -- evaluation ------------------------------------------------------------------------------

    def _maybe_evaluate(self, now: float) -> None:
        if self._next_evaluation is None:
            self._next_evaluation = now + self.config.interval_s
        elif now >= self._next_evaluation:
            self.evaluate()

    def evaluate(self) -> None:
        """Apply the success-rate and latency rules to the calls since the last evaluation."""
        now = self._now()
        self._next_evaluation = now + self.config.interval_s
        for tier in {h.tier for h in self._hosts.values()}:
            self._evaluate_tier(tier, now)
        for host in self._hosts.values():
            if not host.ejected_this_interval and now >= host.ejected_until:
                host.times_ejected = max(0, host.times_ejected - 1)
            host.ejected_this_interval = False
            host.calls = host.failures = 0
            host.seconds = 0.0

    def _evaluate_tier(self, tier: str, now: float) -> None:
        c = self.config
        busy = {
            w: h for w, h in self._hosts.items() if h.tier == tier and h.calls >= c.min_requests
        }
        if len(busy) < c.min_hosts:
            return
        rates = {w: 1 - h.failures / h.calls for w, h in busy.items()}
        mean, stdev = statistics.fmean(rates.values()), statistics.pstdev(rates.values())
        floor = mean - c.stdev_factor * stdev
        for worker_id, rate in rates.items():
            if rate < floor:
                why = f"success rate {rate:.2f} below {floor:.2f} (mean {mean:.2f} of its tier)"
                self._eject(worker_id, busy[worker_id], now, why)
        latencies = {w: h.seconds / h.calls for w, h in busy.items()}
        for worker_id, latency in latencies.items():
            peers = [v for w, v in latencies.items() if w != worker_id]
            ceiling = c.latency_factor * statistics.median(peers)
            if ceiling > 0 and latency > ceiling:
                why = (
                    f"latency {latency:.3f} s above {ceiling:.3f} s "
                    f"({c.latency_factor:g}x its peers' median)"
                )
                self._eject(worker_id, busy[worker_id], now, why)

    def _eject(self, worker_id: str, host: _Host, now: float, why: str) -> None:
        if now < host.ejected_until:
            return
        tier_size = sum(1 for h in self._hosts.values() if h.tier == host.tier)
        allowed = max(1, math.floor(self.config.max_ejected_share * tier_size))
        if len(self.ejected(host.tier)) >= allowed:
            log.warning(
                "outlier not ejected: the tier's ejection share is full",
                worker_id=worker_id,
                tier=host.tier,
                why=why,
            )
            return
        seconds = min(
            self.config.max_ejection_s, self.config.base_ejection_s * 2**host.times_ejected
        )
        host.times_ejected += 1
        host.ejected_until = now + seconds
        host.ejected_this_interval = True
        host.consecutive = 0
        metrics.ROUTER_EJECTIONS.labels(host.tier).inc()
        log.warning("worker ejected", worker_id=worker_id, tier=host.tier, seconds=seconds, why=why)


@dataclass(slots=True)
class RetryBudget:
    """Retries in flight at most `budget_share` of the requests in flight, or `min_retries`."""

    in_flight: Callable[[], int]
    budget_share: float = 0.2
    min_retries: int = 3
    retrying: int = 0

    def acquire(self) -> bool:
        allowed = max(self.min_retries, math.floor(self.budget_share * self.in_flight()))
        if self.retrying >= allowed:
            metrics.ROUTER_RETRIES_DENIED.inc()
            return False
        self.retrying += 1
        return True

    def release(self) -> None:
        self.retrying -= 1
