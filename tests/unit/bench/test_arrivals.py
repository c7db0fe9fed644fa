"""Arrival schedules: mean gap 1/rate; Poisson's gaps vary as much as their mean, gamma's less
or more with its shape; a seed fixes them."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kvmesh.bench.load.arrivals import OpenLoop, arrival_offsets

N = 20_000


def gaps(arrivals: OpenLoop, seed: int = 0) -> np.ndarray:
    return np.diff(arrival_offsets(arrivals, N, seed))


def test_the_first_arrival_is_at_the_start_and_times_increase() -> None:
    offsets = arrival_offsets(OpenLoop(rate=5), 100, 0)
    assert offsets[0] == 0.0
    assert len(offsets) == 100
    assert all(b >= a for a, b in itertools.pairwise(offsets))


def test_a_seed_fixes_the_schedule() -> None:
    assert arrival_offsets(OpenLoop(rate=5), 50, 3) == arrival_offsets(OpenLoop(rate=5), 50, 3)
    assert arrival_offsets(OpenLoop(rate=5), 50, 3) != arrival_offsets(OpenLoop(rate=5), 50, 4)


def test_poisson_gaps_have_mean_one_over_rate_and_unit_variation() -> None:
    g = gaps(OpenLoop(rate=4.0))
    assert g.mean() == pytest.approx(0.25, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_gaps_keep_the_rate_and_vary_as_one_over_sqrt_burstiness(
    burstiness: float,
) -> None:
    g = gaps(OpenLoop(rate=10.0, distribution="gamma", burstiness=burstiness))
    assert g.mean() == pytest.approx(0.1, rel=0.05)
    assert g.std() / g.mean() == pytest.approx(burstiness**-0.5, rel=0.06)


def test_gamma_with_burstiness_one_is_poisson() -> None:
    poisson = arrival_offsets(OpenLoop(rate=3), 100, 1)
    gamma = arrival_offsets(OpenLoop(rate=3, distribution="gamma", burstiness=1.0), 100, 1)
    assert gamma == pytest.approx(poisson)


def test_an_infinite_rate_sends_everything_at_once() -> None:
    assert arrival_offsets(OpenLoop(rate=float("inf")), 4, 0) == [0.0] * 4
    assert arrival_offsets(OpenLoop(rate=1), 0, 0) == []
