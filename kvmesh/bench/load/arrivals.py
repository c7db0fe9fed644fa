"""When requests are sent: an open-loop schedule, or a closed loop of N in flight.

Open loop is what a fleet of independent users looks like: arrivals follow their own clock,
whatever the server's speed, so an overloaded server shows up as growing latency instead of the
generator politely slowing down (the closed-loop blind spot). Inter-arrival gaps are gamma
distributed with mean 1/rate; shape 1 is a Poisson process, a smaller shape ("burstiness") gives
bursts and lulls, a larger one a steadier beat. Arrivals start sessions: a multi-turn session's
later turns are sent as soon as the previous turn completes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True, slots=True)
class OpenLoop:
    rate: float  # sessions started per second (requests/s for one-turn workloads); inf: at once
    distribution: Literal["poisson", "gamma"] = "poisson"
    burstiness: float = 1.0  # the gamma shape; only for distribution="gamma"

    @property
    def shape(self) -> float:
        return 1.0 if self.distribution == "poisson" else self.burstiness

    def describe(self) -> str:
        if math.isinf(self.rate):
            return "all at once"
        if self.distribution == "poisson":
            return f"poisson, {self.rate:g} req/s"
        return f"gamma (burstiness {self.burstiness:g}), {self.rate:g} req/s"


@dataclass(frozen=True, slots=True)
class ClosedLoop:
    concurrency: int  # sessions in flight; each sends its next request when the last completes

    def describe(self) -> str:
        return f"closed loop, concurrency {self.concurrency}"


Arrivals = OpenLoop | ClosedLoop


def arrival_offsets(arrivals: OpenLoop, n: int, seed: int) -> list[float]:
    """Seconds from the start at which each of `n` sessions starts; the first at 0."""
    if n <= 0:
        return []
    if math.isinf(arrivals.rate):
        return [0.0] * n
    rng = np.random.default_rng((seed, 1))  # a stream apart from the workload's: they vary alone
    gaps = rng.gamma(arrivals.shape, 1.0 / (arrivals.rate * arrivals.shape), size=n - 1)
    return [0.0, *(float(t) for t in np.cumsum(gaps))]
