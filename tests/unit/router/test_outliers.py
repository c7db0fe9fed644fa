"""Outlier ejection and the retry budget, rule by rule, as Envoy's unit tests take them."""

from __future__ import annotations

import pytest

from services.router.outliers import OutlierConfig, OutlierDetector, RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def detector(**config: float) -> tuple[OutlierDetector, Clock]:
    clock = Clock()
    return OutlierDetector(OutlierConfig(**config), clock=clock), clock  # type: ignore[arg-type]


def test_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    d, _ = detector(consecutive_failures=3)
    for worker in ("a", "b", "c", "d"):
        d.record(worker, "decode", ok=True)
    d.record("a", "decode", ok=False)
    d.record("a", "decode", ok=False)
    d.record("a", "decode", ok=True)  # the run is broken
    d.record("a", "decode", ok=False)
    d.record("a", "decode", ok=False)
    assert not d.is_ejected("a")
    d.record("a", "decode", ok=False)
    assert d.is_ejected("a")
    assert d.ejected("decode") == ["a"]


def test_an_ejection_ends_and_each_repeat_doubles_it_up_to_the_maximum() -> None:
    d, clock = detector(consecutive_failures=1, base_ejection_s=5, max_ejection_s=18)
    d.record("b", "decode", ok=True)
    d.record("c", "decode", ok=True)
    lengths = []
    for _ in range(4):
        d.record("a", "decode", ok=False)
        start = clock.now
        while d.is_ejected("a"):
            clock.now += 0.5
        lengths.append(clock.now - start)
    assert lengths == [5, 10, 18, 18]


def test_the_repeat_count_decays_over_quiet_intervals() -> None:
    d, clock = detector(consecutive_failures=1, base_ejection_s=5, interval_s=10)
    d.record("b", "decode", ok=True)
    d.record("a", "decode", ok=False)  # 5 s
    clock.now += 6
    d.record("a", "decode", ok=False)  # the second in a row: 10 s
    assert d.is_ejected("a")
    clock.now += 11
    for _ in range(3):  # three quiet intervals: the count falls back to 0
        clock.now += 10
        d.evaluate()
    d.record("a", "decode", ok=False)
    clock.now += 5.5
    assert not d.is_ejected("a")  # a first ejection again: 5 s


def test_at_most_the_share_is_ejected_but_always_one() -> None:
    d, _ = detector(consecutive_failures=1, max_ejected_share=0.5)
    for worker in ("a", "b", "c", "d"):
        d.record(worker, "decode", ok=True)
    for worker in ("a", "b", "c"):
        d.record(worker, "decode", ok=False)
    assert sorted(d.ejected("decode")) == ["a", "b"]  # half of four
    d2, _ = detector(consecutive_failures=1, max_ejected_share=0.1)
    d2.record("x", "prefill", ok=True)
    d2.record("y", "prefill", ok=False)
    assert d2.ejected("prefill") == ["y"]  # 10 % of two rounds down to 0: one all the same


def test_tiers_are_judged_apart() -> None:
    d, _ = detector(consecutive_failures=1, max_ejected_share=0.5)
    d.record("p", "prefill", ok=True)
    d.record("d", "decode", ok=True)
    d.record("p2", "prefill", ok=False)
    assert d.ejected("prefill") == ["p2"] and d.ejected("decode") == []


def test_a_success_rate_below_mean_minus_the_stdev_factor_is_ejected() -> None:
    d, _ = detector(consecutive_failures=1000, min_hosts=3, min_requests=10, stdev_factor=1.0)
    for worker, failures in (("a", 0), ("b", 0), ("c", 1), ("d", 0), ("bad", 6)):
        for i in range(20):
            d.record(worker, "decode", ok=i >= failures)
    d.evaluate()
    assert d.ejected("decode") == ["bad"]


def test_success_rate_needs_enough_hosts_and_requests() -> None:
    d, _ = detector(consecutive_failures=1000, min_hosts=3, min_requests=10)
    for worker, failures in (("a", 0), ("bad", 9)):  # two hosts only
        for i in range(20):
            d.record(worker, "decode", ok=i >= failures)
    d.record("c", "decode", ok=True)  # a third with too few calls
    d.evaluate()
    assert d.ejected("decode") == []


def test_a_latency_far_above_the_peers_median_is_ejected() -> None:
    d, _ = detector(consecutive_failures=1000, min_hosts=3, min_requests=5, latency_factor=3)
    for worker, seconds in (("a", 0.01), ("b", 0.012), ("c", 0.011), ("slow", 0.05)):
        for _ in range(10):
            d.record(worker, "decode", ok=True, seconds=seconds)
    d.evaluate()
    assert d.ejected("decode") == ["slow"]


def test_evaluation_happens_by_itself_every_interval() -> None:
    d, clock = detector(consecutive_failures=1000, interval_s=10, min_requests=5, latency_factor=3)
    for worker, seconds in (("a", 0.01), ("b", 0.01), ("c", 0.01), ("slow", 0.1)):
        for _ in range(5):
            d.record(worker, "decode", ok=True, seconds=seconds)
    assert d.ejected("decode") == []
    clock.now += 10
    d.record("a", "decode", ok=True, seconds=0.01)  # the next call past the interval
    assert d.ejected("decode") == ["slow"]


@pytest.mark.parametrize(("in_flight", "allowed"), [(0, 3), (10, 3), (40, 8), (100, 20)])
def test_the_retry_budget_is_a_share_of_requests_with_a_minimum(
    in_flight: int, allowed: int
) -> None:
    budget = RetryBudget(in_flight=lambda: in_flight, budget_share=0.2, min_retries=3)
    granted = sum(budget.acquire() for _ in range(allowed + 5))
    assert granted == allowed
    budget.release()
    assert budget.acquire()
