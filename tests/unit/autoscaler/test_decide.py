"""The scaler's decisions, tick by tick on a fake clock: steps, delays, zero, wake, SLA, clamps."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from kvmesh.api.v1 import common_pb2
from kvmesh.errors import InvalidRequestError
from services.autoscaler.decide import Decision, LatencySample, Observation, Scaler
from services.autoscaler.policy import Policy


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scaler(clock: FakeClock, **changes: Any) -> Scaler:
    """A load-mode decode scaler: 8 x 0.7 = 5.6 requests per replica, window 1 s (each tick on
    its own unless a test widens it), delay 60 s, step 2, replicas 1..8."""
    policy = dataclasses.replace(Policy(model="m", tier="decode", window_s=1.0), **changes)
    return Scaler(policy, clock=clock)


def at(clock: FakeClock, t: float, s: Scaler, current: int, load: int = 0, **kw: Any) -> Decision:
    clock.now = 1000.0 + t
    return s.tick(Observation(ready_replicas=current, in_flight=load, **kw))


# -- load mode -------------------------------------------------------------------------------------


def test_load_scale_up_is_immediate_and_explained() -> None:
    clock = FakeClock()
    d = at(clock, 0, scaler(clock), current=2, load=12)
    assert (d.current, d.desired) == (2, 3)
    assert d.reason == "load 12.0 over 2 replicas at 8 x 0.7 per replica needs 3; +1 (max step 2)"
    assert d.inputs["load_mean"] == 12.0
    assert d.inputs["per_replica"] == pytest.approx(5.6)
    assert (d.inputs["needed"], d.inputs["target"], d.inputs["desired"]) == (3, 3, 3)
    assert (d.time, d.model, d.tier) == (1000.0, "m", "decode")


def test_scale_up_is_limited_by_max_step() -> None:
    clock = FakeClock()
    d = at(clock, 0, scaler(clock), current=1, load=40)
    assert d.desired == 3
    assert d.reason.endswith("needs 8; +2 (max step 2)")


def test_queued_requests_count_as_load() -> None:
    clock = FakeClock()
    s = scaler(clock)
    clock.now = 1000.0
    d = s.tick(Observation(ready_replicas=1, in_flight=5, queued=6))
    assert d.inputs["load"] == 11
    assert d.desired == 2


def test_an_exact_multiple_of_the_per_replica_load_needs_no_extra_replica() -> None:
    clock = FakeClock()
    # 8 x 0.5 = 4 per replica exactly; 11.2 over 5.6 is 2 up to rounding.
    assert at(clock, 0, scaler(clock, target_utilization=0.5), current=3, load=12).desired == 3
    assert at(clock, 0, scaler(clock), current=2, load=0).inputs["needed"] == 0
    d = at(clock, 0, scaler(clock, replica_concurrency=4, target_utilization=0.7), 2, load=0)
    assert d.inputs["needed"] == 0
    s = scaler(clock, window_s=30.0)
    at(clock, 0, s, current=2, load=11)
    assert at(clock, 1, s, current=2, load=12).inputs["needed"] == 3  # mean 11.5 / 5.6


def test_load_is_averaged_over_the_window_and_old_ticks_fall_out() -> None:
    clock = FakeClock()
    s = scaler(clock, window_s=30.0, scale_down_delay_s=0.0)
    assert at(clock, 0, s, current=1, load=28).desired == 3  # needs 5, +2
    d = at(clock, 10, s, current=3, load=0)
    assert (d.inputs["load_mean"], d.inputs["window_ticks"], d.desired) == (14.0, 2, 3)
    d = at(clock, 20, s, current=3, load=2)
    assert d.inputs["load_mean"] == 10.0
    assert d.desired == 2  # needs ceil(10 / 5.6) = 2; no delay in this policy
    d = at(clock, 30, s, current=2, load=0)  # the tick of t=0 is now 30 s old: out
    assert d.inputs["window_ticks"] == 3
    assert d.inputs["load_mean"] == pytest.approx(2 / 3)
    assert d.desired == 1


# -- scale-down delay ------------------------------------------------------------------------------


def test_scale_down_waits_for_the_delay_and_a_busy_tick_resets_it() -> None:
    clock = FakeClock()
    s = scaler(clock)
    assert at(clock, 0, s, current=3, load=2).desired == 3
    d = at(clock, 45, s, current=3, load=2)
    assert d.desired == 3
    assert d.reason == (
        "load 2.0 over 3 replicas at 8 x 0.7 per replica needs 1; "
        "below target for 45 s of the 60 s scale-down delay: holding 3"
    )
    assert d.inputs["below_for_s"] == 45.0
    assert at(clock, 50, s, current=3, load=14).desired == 3  # needs 3: at target, timer reset
    assert at(clock, 70, s, current=3, load=2).desired == 3  # 60 s since t=0, but reset at 50
    assert at(clock, 129, s, current=3, load=2).desired == 3  # 59 s since t=70
    d = at(clock, 130, s, current=3, load=2)
    assert d.desired == 1
    assert d.reason.endswith("needs 1; below target for 60 s: -2 (max step 2)")


def test_scale_down_steps_by_max_step_per_tick_once_the_delay_has_passed() -> None:
    clock = FakeClock()
    s = scaler(clock, max_step=2)
    at(clock, 0, s, current=7, load=1)
    assert at(clock, 60, s, current=7, load=1).desired == 5
    # The actuator has not removed anyone yet: the scaler asks for the same, not for 3.
    assert at(clock, 65, s, current=7, load=1).desired == 5
    assert at(clock, 70, s, current=5, load=1).desired == 3  # the timer still runs
    assert at(clock, 75, s, current=3, load=1).desired == 1
    d = at(clock, 80, s, current=1, load=1)
    assert (d.desired, d.reason.endswith("needs 1; holding 1")) == (1, True)


def test_zero_delay_scales_down_at_once() -> None:
    clock = FakeClock()
    assert at(clock, 0, scaler(clock, scale_down_delay_s=0.0), current=4, load=1).desired == 2


# -- scale to zero and wake ------------------------------------------------------------------------


def test_scale_to_zero_after_a_whole_delay_without_demand() -> None:
    clock = FakeClock()
    s = scaler(clock, min_replicas=0)
    assert at(clock, 0, s, current=1, load=3).desired == 1
    d = at(clock, 10, s, current=1)
    assert d.reason.endswith(
        "needs 0; below target for 0 s of the 60 s scale-down delay: holding 1"
    )
    assert at(clock, 69, s, current=1).desired == 1
    d = at(clock, 70, s, current=1)
    assert d.desired == 0
    assert d.reason.endswith("needs 0; idle for 60 s: scaling to zero")
    d = at(clock, 75, s, current=0)
    assert (d.desired, d.reason.endswith("needs 0; holding 0")) == (0, True)


def test_the_last_replica_waits_for_idle_time_not_just_for_below_target_time() -> None:
    clock = FakeClock()
    s = scaler(clock, min_replicas=0, max_step=3)
    at(clock, 0, s, current=3, load=2)  # needs 1 of 3: the down timer starts
    at(clock, 50, s, current=3)  # no demand from here on
    d = at(clock, 60, s, current=3)
    assert d.desired == 1
    assert d.reason.endswith(
        "needs 0; below target for 60 s: -2 (max step 3); "
        "idle for 10 s of the 60 s scale-down delay: keeping 1"
    )
    d = at(clock, 100, s, current=1)
    assert d.desired == 1
    assert d.reason.endswith("idle for 50 s of the 60 s scale-down delay: holding 1")
    assert at(clock, 110, s, current=1).desired == 0


def test_a_latency_sample_is_demand_and_restarts_the_idle_time() -> None:
    clock = FakeClock()
    s = scaler(clock, min_replicas=0)
    at(clock, 0, s, current=1)
    sample = (LatencySample(time=1030.0, seconds=0.02),)
    d = at(clock, 30, s, current=1, itl=sample)  # a request ran between ticks
    assert d.desired == 1
    assert d.reason.endswith("needs 0, at least 1 while there is demand; holding 1")
    assert at(clock, 31, s, current=1).desired == 1  # idle (and below target) from here
    assert at(clock, 90, s, current=1).desired == 1  # idle since 31, not since 0
    assert at(clock, 91, s, current=1).desired == 0


def test_wake_from_zero_is_immediate() -> None:
    clock = FakeClock()
    s = scaler(clock, min_replicas=0, window_s=600.0)
    at(clock, 0, s, current=0)
    d = at(clock, 1, s, current=0, waiting_for_wake=True)
    assert d.desired == 1
    assert d.reason == "a request is waiting for a tier with no replicas: waking to 1"
    assert d.inputs["waiting_for_wake"] == 1.0


def test_wake_goes_to_min_replicas_even_past_max_step() -> None:
    clock = FakeClock()
    s = scaler(clock, min_replicas=3, max_step=1)
    d = at(clock, 0, s, current=0, waiting_for_wake=True)
    assert d.desired == 3
    assert d.reason.endswith("waking to 3")


def test_below_min_without_a_wake_signal_climbs_by_max_step() -> None:
    clock = FakeClock()
    d = at(clock, 0, scaler(clock, min_replicas=3, max_step=1), current=0)
    assert d.desired == 1
    assert d.reason.endswith("needs 0, raised to min 3; +1 (max step 1)")


# -- clamps ----------------------------------------------------------------------------------------


def test_needed_replicas_are_clamped_to_min_and_max() -> None:
    clock = FakeClock()
    d = at(clock, 0, scaler(clock, max_replicas=8), current=8, load=200)
    assert d.desired == 8
    assert d.reason.endswith("needs 36, capped at max 8; holding 8")
    assert (d.inputs["needed"], d.inputs["target"]) == (36, 8)
    d = at(clock, 0, scaler(clock, min_replicas=2), current=2, load=0)
    assert d.desired == 2
    assert d.reason.endswith("needs 0, raised to min 2; holding 2")


def test_above_max_after_a_policy_change_steps_down_at_once() -> None:
    clock = FakeClock()
    s = scaler(clock)
    at(clock, 0, s, current=6, load=30)
    s.set_policy(dataclasses.replace(s.policy, max_replicas=3))
    d = at(clock, 1, s, current=6, load=30)
    assert d.desired == 4
    assert d.reason == "6 replicas exceed max 3: -2 (max step 2)"
    assert at(clock, 2, s, current=4, load=30).desired == 3


def test_set_policy_refuses_another_model_or_an_invalid_policy() -> None:
    s = scaler(FakeClock())
    with pytest.raises(ValueError, match="cannot take the policy of other/decode"):
        s.set_policy(dataclasses.replace(s.policy, model="other"))
    with pytest.raises(InvalidRequestError, match="max_step"):
        s.set_policy(dataclasses.replace(s.policy, max_step=0))


# -- SLA mode --------------------------------------------------------------------------------------


def _samples(t: float, *seconds: float) -> tuple[LatencySample, ...]:
    return tuple(LatencySample(time=1000.0 + t, seconds=v) for v in seconds)


def sla(clock: FakeClock, tier: str, **changes: Any) -> Scaler:
    targets: dict[str, Any] = (
        {"target_ttft_s": 0.5} if tier == "prefill" else {"target_itl_s": 0.05}
    )
    policy = Policy(model="m", tier=tier, mode="sla", window_s=30.0, **targets)
    return Scaler(dataclasses.replace(policy, **changes), clock=clock)


def test_sla_prefill_scales_up_from_the_p90_ttft() -> None:
    clock = FakeClock()
    ttft = _samples(0, *[0.2] * 8, 1.0, 1.0)  # mean 0.36 would be within target; p90 is not
    d = at(clock, 0, sla(clock, "prefill"), current=2, load=3, ttft=ttft)
    assert d.desired == 4
    assert d.reason == (
        "p90 TTFT 1.000 s against a 0.5 s target over 2 replicas needs 4; +2 (max step 2)"
    )
    assert (d.inputs["observed_s"], d.inputs["target_s"], d.inputs["samples"]) == (1.0, 0.5, 10)


def test_counted_samples_weigh_as_many_samples() -> None:
    clock = FakeClock()
    # a histogram's share: 8 requests at 0.2 s and 2 at 1.0 s is the test above, bucketed
    ttft = (LatencySample(1000.0, 0.2, count=8), LatencySample(1000.0, 1.0, count=2))
    d = at(clock, 0, sla(clock, "prefill"), current=2, load=3, ttft=ttft)
    assert (d.desired, d.inputs["observed_s"], d.inputs["samples"]) == (4, 1.0, 10)
    itl = (LatencySample(1000.0, 0.01, count=3), LatencySample(1000.0, 0.05, count=1))
    d = at(clock, 0, sla(clock, "decode"), current=4, load=3, itl=itl)
    assert d.inputs["observed_s"] == pytest.approx(0.02)  # (3 x 0.01 + 0.05) / 4


def test_sla_prefill_ignores_itl_and_decode_ignores_ttft() -> None:
    clock = FakeClock()
    d = at(clock, 0, sla(clock, "prefill"), current=2, load=3, itl=_samples(0, 9.0))
    assert d.inputs["samples"] == 0
    d = at(clock, 0, sla(clock, "decode"), current=2, load=3, ttft=_samples(0, 9.0))
    assert d.inputs["samples"] == 0


def test_sla_decode_scales_down_from_the_mean_itl() -> None:
    clock = FakeClock()
    s = sla(clock, "decode", scale_down_delay_s=0.0)
    d = at(clock, 0, s, current=4, load=3, itl=_samples(0, 0.01, 0.02, 0.03))
    assert d.desired == 2
    assert d.reason == (
        "mean ITL 0.020 s against a 0.05 s target over 4 replicas needs 2; "
        "below target for 0 s: -2 (max step 2)"
    )


def test_sla_decode_at_target_holds() -> None:
    clock = FakeClock()
    d = at(clock, 0, sla(clock, "decode"), current=3, load=3, itl=_samples(0, 0.05, 0.05))
    assert d.desired == 3
    assert d.reason.endswith("needs 3; holding 3")


def test_sla_without_samples_keeps_current_while_there_is_demand() -> None:
    clock = FakeClock()
    d = at(clock, 0, sla(clock, "decode"), current=3, load=5)
    assert d.desired == 3
    assert d.reason == "no mean ITL samples in the 30 s window: keeping it; holding 3"
    d = at(clock, 0, sla(clock, "prefill", min_replicas=0), current=3)
    assert d.inputs["needed"] == 0
    assert d.reason.startswith("no demand in the 30 s window needs 0; below target")


def test_sla_samples_leave_the_window() -> None:
    clock = FakeClock()
    s = sla(clock, "decode", scale_down_delay_s=0.0)
    assert at(clock, 0, s, current=2, load=3, itl=_samples(0, 0.2)).desired == 4  # needs 8
    d = at(clock, 10, s, current=4, load=3, itl=_samples(10, 0.01))
    assert d.inputs["observed_s"] == pytest.approx(0.105)
    d = at(clock, 30, s, current=4, load=3)  # the sample of t=0 is out; 0.01 remains
    assert d.inputs["samples"] == 1
    assert d.desired == 2  # needs ceil(4 x 0.01 / 0.05) = 1, down by the max step


def test_sla_never_goes_below_one_while_there_is_demand() -> None:
    clock = FakeClock()
    s = sla(clock, "decode", min_replicas=0)
    d = at(clock, 0, s, current=0, load=2, itl=_samples(0, 0.9))
    assert d.desired == 1
    assert d.reason.endswith(
        "over 0 replicas needs 0, at least 1 while there is demand; +1 (max step 2)"
    )


def test_a_decision_converts_to_proto() -> None:
    clock = FakeClock(now=1_700_000_000.25)
    s = scaler(clock)
    d = s.tick(Observation(ready_replicas=2, in_flight=12))
    message = d.to_proto()
    assert message.time.seconds == 1_700_000_000
    assert message.time.nanos == 250_000_000
    assert message.tier == common_pb2.TIER_DECODE
    assert (message.current_replicas, message.desired_replicas) == (2, 3)
    assert message.reason == d.reason
    assert dict(message.inputs) == d.inputs


def test_the_same_inputs_give_the_same_decisions() -> None:
    def run() -> list[tuple[int, str]]:
        clock = FakeClock()
        s = scaler(clock, window_s=20.0, min_replicas=0)
        loads = [0, 9, 30, 4] + [0] * 16
        current, out = 1, []
        for i, load in enumerate(loads * 2):
            d = at(clock, 10 * i, s, current=current, load=load)
            current = d.desired
            out.append((d.desired, d.reason))
        return out

    first = run()
    assert first == run()
    assert {desired for desired, _ in first} >= {0, 1, 3}
