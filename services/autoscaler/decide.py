"""From observations to a replica count: one `Scaler` per (model, tier), one `Decision` per tick.

Each tick the service hands the scaler an `Observation` (ready replicas, requests in flight and
queued over the tier, the latency samples that arrived since the last tick, and whether a request
waits for a tier with no replicas). The scaler keeps `window_s` of them and decides in two steps.

**What the window needs** (`needed`):

- load mode: `ceil(mean load / (replica_concurrency x target_utilization))`;
- SLA mode, proportional: `ceil(current x observed / target)` with the window's p90 TTFT for
  prefill and mean inter-token latency for decode; with demand but no samples, keep `current`;
- either mode: at least 1 while the window shows demand (load, or a latency sample: a request
  was served), and then clamped to [min_replicas, max_replicas].

**How far to move** from the ready replicas:

- wake: no replicas and a request waiting -> `max(1, min_replicas)` at once, whatever the window;
- above max_replicas (max lowered at run time) -> down at once, at most `max_step`;
- up -> at once, at most `max_step`;
- down -> only once `needed` has stayed below `current` for `scale_down_delay_s` without a
  break (a tick at or above resets the timer), then at most `max_step` per tick; the last
  replica goes (scale to zero, min 0) only after no demand at all for the whole delay.

Steps are taken from the *ready* replicas, not from the last decision: while the actuator is
still adding or draining replicas the scaler keeps asking for the same number instead of
stacking steps, and the timer is not restarted by a step down, so a long-idle tier shrinks by
`max_step` per tick as fast as the actuator follows.

Everything is a function of the observations and the injected clock: no I/O, no sleeps.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from kvmesh.api.v1 import autoscaler_pb2
from services.autoscaler.policy import LOAD, PREFILL, Policy, tier_to_proto

# ceil() of a ratio that is an integer up to rounding (11.2 / 5.6) must not add a replica.
_EPSILON = 1e-9
DEFAULT_MAX_SAMPLES = 10_000  # latency samples kept per scaler: bounds memory at high rates


@dataclass(frozen=True, slots=True)
class LatencySample:
    time: float  # when it was measured, on the scaler's clock
    seconds: float
    count: int = 1  # this many requests (or tokens) took `seconds`: a histogram bucket's share


@dataclass(frozen=True, slots=True)
class Observation:
    """One tick's view of one (model, tier). Pass each latency sample once: the new ones."""

    ready_replicas: int
    in_flight: int = 0  # summed over the tier's replicas
    queued: int = 0
    ttft: Sequence[LatencySample] = ()  # time to first token (what prefill controls)
    itl: Sequence[LatencySample] = ()  # inter-token latency (what decode controls)
    waiting_for_wake: bool = False  # a request waits for this tier and it has no replicas

    @property
    def load(self) -> int:
        return self.in_flight + self.queued


@dataclass(frozen=True, slots=True)
class Decision:
    time: float
    model: str
    tier: str
    current: int
    desired: int
    reason: str  # a sentence: what the window needs and why the step is what it is
    inputs: Mapping[str, float]  # every number the reason used

    def to_proto(self) -> autoscaler_pb2.ScalingDecision:
        seconds = math.floor(self.time)
        nanos = min(round((self.time - seconds) * 1e9), 999_999_999)
        message = autoscaler_pb2.ScalingDecision(
            time=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
            model=self.model,
            tier=tier_to_proto(self.tier),
            current_replicas=self.current,
            desired_replicas=self.desired,
            reason=self.reason,
            inputs=dict(self.inputs),
        )
        return message


@dataclass(frozen=True, slots=True)
class _Need:
    replicas: int
    because: str  # "load 12.0 over 2 replicas at 8 x 0.7 per replica needs 3"


class Scaler:
    """Decides the replica count of one (model, tier), tick after tick.

    `clock` gives seconds; the wall clock by default, because decisions are reported with their
    time and latency samples arrive stamped by other processes. Samples must use the same clock.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        clock: Callable[[], float] = time.time,
        max_samples: int = DEFAULT_MAX_SAMPLES,
    ) -> None:
        policy.validate()
        self._policy = policy
        self._clock = clock
        self._loads: deque[tuple[float, int]] = deque()  # (time, in flight + queued)
        self._samples: deque[LatencySample] = deque(maxlen=max_samples)  # the tier's metric
        self._below_since: float | None = None  # first tick of the current "fewer would do"
        self._idle_since: float | None = None  # first tick of the current run without demand

    @property
    def policy(self) -> Policy:
        return self._policy

    def set_policy(self, policy: Policy) -> None:
        """Take a changed policy; the window and the timers carry over."""
        policy.validate()
        if (policy.model, policy.tier) != (self._policy.model, self._policy.tier):
            raise ValueError(
                f"a scaler of {self._policy.model}/{self._policy.tier} cannot take the policy "
                f"of {policy.model}/{policy.tier}"
            )
        self._policy = policy

    def tick(self, observation: Observation) -> Decision:
        now = self._clock()
        self._remember(now, observation)
        current = observation.ready_replicas
        inputs: dict[str, float] = {
            "current": current,
            "load": observation.load,
            "min_replicas": self._policy.min_replicas,
            "max_replicas": self._policy.max_replicas,
            "max_step": self._policy.max_step,
            "waiting_for_wake": float(observation.waiting_for_wake),
        }
        need = self._need(current, inputs)
        desired, reason = self._step(now, current, need, observation.waiting_for_wake, inputs)
        inputs["desired"] = desired
        return Decision(
            time=now,
            model=self._policy.model,
            tier=self._policy.tier,
            current=current,
            desired=desired,
            reason=reason,
            inputs=inputs,
        )

    # -- the window --------------------------------------------------------------------------------

    def _remember(self, now: float, observation: Observation) -> None:
        p = self._policy
        samples = observation.ttft if p.tier == PREFILL else observation.itl
        self._loads.append((now, observation.load))
        self._samples.extend(samples)
        cutoff = now - p.window_s
        while self._loads and self._loads[0][0] <= cutoff:
            self._loads.popleft()
        if any(s.time <= cutoff for s in self._samples):  # samples may arrive out of order
            kept = [s for s in self._samples if s.time > cutoff]
            self._samples.clear()
            self._samples.extend(kept)
        is_idle = observation.load == 0 and not samples and not observation.waiting_for_wake
        if not is_idle:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now

    def _need(self, current: int, inputs: dict[str, float]) -> _Need:
        p = self._policy
        mean_load = sum(load for _, load in self._loads) / len(self._loads)
        has_demand = mean_load > 0 or bool(self._samples)
        inputs |= {"load_mean": mean_load, "window_ticks": len(self._loads)}
        if p.mode == LOAD:
            per_replica = p.replica_concurrency * p.target_utilization
            replicas = _ceil(mean_load / per_replica)
            inputs["per_replica"] = per_replica
            because = (
                f"load {mean_load:.1f} over {_replicas(current)} at {p.replica_concurrency} x "
                f"{p.target_utilization:g} per replica needs {replicas}"
            )
        else:
            replicas, because = self._sla_need(current, has_demand, inputs)
        inputs["needed"] = replicas
        if has_demand and replicas < 1:
            replicas = 1
            because += ", at least 1 while there is demand"
        if replicas < p.min_replicas:
            replicas = p.min_replicas
            because += f", raised to min {p.min_replicas}"
        elif replicas > p.max_replicas:
            replicas = p.max_replicas
            because += f", capped at max {p.max_replicas}"
        inputs["target"] = replicas
        return _Need(replicas, because)

    def _sla_need(
        self, current: int, has_demand: bool, inputs: dict[str, float]
    ) -> tuple[int, str]:
        p = self._policy
        samples = [s for s in self._samples if s.count > 0]
        total = sum(s.count for s in samples)
        inputs["samples"] = total
        if p.tier == PREFILL:
            metric, target = "p90 TTFT", p.target_ttft_s
            observed = _p90(samples) if samples else math.nan
        else:
            metric, target = "mean ITL", p.target_itl_s
            observed = sum(s.seconds * s.count for s in samples) / total if samples else math.nan
        inputs["target_s"] = target
        if not samples:
            if has_demand:
                return current, f"no {metric} samples in the {p.window_s:g} s window: keeping it"
            return 0, f"no demand in the {p.window_s:g} s window needs 0"
        inputs["observed_s"] = observed
        replicas = _ceil(current * observed / target)
        because = (
            f"{metric} {observed:.3f} s against a {target:g} s target over {_replicas(current)} "
            f"needs {replicas}"
        )
        return replicas, because

    # -- the step ----------------------------------------------------------------------------------

    def _step(
        self, now: float, current: int, need: _Need, waiting: bool, inputs: dict[str, float]
    ) -> tuple[int, str]:
        p = self._policy
        if current == 0 and waiting:
            self._below_since = None
            woken = max(1, p.min_replicas)
            return woken, f"a request is waiting for a tier with no replicas: waking to {woken}"
        if current > p.max_replicas:
            self._below_since = None
            desired = max(p.max_replicas, current - p.max_step)
            return desired, (
                f"{_replicas(current)} exceed max {p.max_replicas}: "
                f"-{current - desired} (max step {p.max_step})"
            )
        if need.replicas >= current:
            self._below_since = None
            if need.replicas == current:
                return current, f"{need.because}; holding {current}"
            desired = min(need.replicas, current + p.max_step)
            return desired, f"{need.because}; +{desired - current} (max step {p.max_step})"
        if self._below_since is None:
            self._below_since = now
        below_for = now - self._below_since
        inputs["below_for_s"] = below_for
        if below_for < p.scale_down_delay_s:
            return current, (
                f"{need.because}; below target for {below_for:.0f} s of the "
                f"{p.scale_down_delay_s:g} s scale-down delay: holding {current}"
            )
        desired = max(need.replicas, current - p.max_step)
        if desired == 0:
            idle_for = now - self._idle_since if self._idle_since is not None else 0.0
            inputs["idle_for_s"] = idle_for
            if self._idle_since is not None and idle_for >= p.scale_down_delay_s:
                return 0, f"{need.because}; idle for {idle_for:.0f} s: scaling to zero"
            desired = 1  # the last replica waits for a whole delay without demand
            idle = f"idle for {idle_for:.0f} s of the {p.scale_down_delay_s:g} s scale-down delay"
            if current == 1:
                return 1, f"{need.because}; {idle}: holding 1"
            return 1, (
                f"{need.because}; below target for {below_for:.0f} s: -{current - 1} "
                f"(max step {p.max_step}); {idle}: keeping 1"
            )
        return desired, (
            f"{need.because}; below target for {below_for:.0f} s: -{current - desired} "
            f"(max step {p.max_step})"
        )


def _ceil(ratio: float) -> int:
    return max(0, math.ceil(ratio - _EPSILON))


def _p90(samples: Sequence[LatencySample]) -> float:
    """Nearest rank: the smallest value that at least 90 % of the samples do not exceed
    (a sample of count n counts n times)."""
    ordered = sorted(samples, key=lambda s: s.seconds)
    rank = max(1, math.ceil(0.9 * sum(s.count for s in ordered)))
    seen = 0
    for sample in ordered:
        seen += sample.count
        if seen >= rank:
            return sample.seconds
    return ordered[-1].seconds


def _replicas(n: int) -> str:
    return f"{n} replica" if n == 1 else f"{n} replicas"
