"""The tick loop over fakes (a fake policy store, observer, pair source and KV writer; no
registry): decisions, the decision log, gauges, and desired counts published only on change."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kvmesh.discovery import DiscoveryError
from kvmesh.telemetry import metrics
from services.autoscaler.decide import Decision, Observation
from services.autoscaler.loop import (
    AutoscalerLoop,
    DecisionLog,
    Pair,
)
from services.autoscaler.policy import Policy


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeStore:
    def __init__(self, *policies: Policy) -> None:
        self.stored = list(policies)
        self.fail = False

    async def policies(self) -> list[Policy]:
        if self.fail:
            raise DiscoveryError("registry down")
        return list(self.stored)


class FakeObserver:
    def __init__(self) -> None:
        self.observations: dict[Pair, Observation] = {}

    async def observe(self, model: str, tier: str) -> Observation:
        return self.observations.get((model, tier), Observation(ready_replicas=0))


class FakePairs:
    def __init__(self, *pairs: Pair) -> None:
        self.seen = set(pairs)

    async def pairs(self) -> set[Pair]:
        return set(self.seen)


class FakeKv:
    def __init__(self) -> None:
        self.writes: list[tuple[str, dict[str, object]]] = []
        self.fail = False

    async def kv_put(self, key: str, value: bytes | str) -> bool:
        if self.fail:
            raise DiscoveryError("registry down")
        self.writes.append((key, json.loads(value)))
        return True


DECODE = Policy(model="m", tier="decode", min_replicas=1, max_replicas=6, max_step=2, window_s=1)


class Harness:
    def __init__(self, *policies: Policy, pairs: tuple[Pair, ...] = ()) -> None:
        self.clock = FakeClock()
        self.store = FakeStore(*policies)
        self.observer = FakeObserver()
        self.kv = FakeKv()
        self.log = DecisionLog()
        self.loop = AutoscalerLoop(
            self.store,
            self.observer,
            self.log,
            self.kv,
            pair_source=FakePairs(*pairs),
            tick_s=5.0,
            clock=self.clock,
        )

    def observe(self, model: str, tier: str, ready: int, in_flight: int = 0) -> None:
        self.observer.observations[(model, tier)] = Observation(ready, in_flight=in_flight)

    async def tick(self) -> list[Decision]:
        decisions = await self.loop.tick()
        self.clock.now += 5.0
        return decisions


def _gauges(model: str, tier: str) -> tuple[float, float]:
    desired = metrics.AUTOSCALER_DESIRED_REPLICAS.labels(model, tier)._value.get()
    actual = metrics.AUTOSCALER_ACTUAL_REPLICAS.labels(model, tier)._value.get()
    return desired, actual


async def test_a_tick_decides_logs_sets_gauges_and_publishes() -> None:
    h = Harness(DECODE)
    h.observe("m", "decode", ready=1, in_flight=12)  # 12 / 5.6 needs 3: +2 at most
    [decision] = await h.tick()
    assert (decision.model, decision.tier, decision.current, decision.desired) == (
        "m",
        "decode",
        1,
        3,
    )
    assert h.log.recent() == [decision]
    assert _gauges("m", "decode") == (3, 1)
    assert h.kv.writes == [
        (
            "kvmesh/autoscaler/desired/m/decode",
            {"desired": 3, "reason": decision.reason, "time": 1000.0},
        )
    ]


async def test_desired_is_published_only_when_it_changes() -> None:
    h = Harness(DECODE)
    h.observe("m", "decode", ready=1, in_flight=12)
    await h.tick()
    await h.tick()  # still asks for 3 while the actuator catches up
    assert [w[1]["desired"] for w in h.kv.writes] == [3]
    h.observe("m", "decode", ready=3, in_flight=30)  # 30 / 5.6 needs 6
    await h.tick()
    assert [w[1]["desired"] for w in h.kv.writes] == [3, 5]
    assert len(h.log.recent()) == 3


async def test_an_unchanged_desired_is_published_again_after_a_while() -> None:
    """A registry restarted without its data has lost the key: it comes back within 30 s."""
    h = Harness(DECODE)
    h.observe("m", "decode", ready=1, in_flight=12)
    for _ in range(7):  # 5 s a tick: 35 s
        await h.tick()
    assert [w[1]["desired"] for w in h.kv.writes] == [3, 3]


async def test_a_failed_publish_is_retried_on_the_next_tick() -> None:
    h = Harness(DECODE)
    h.observe("m", "decode", ready=1, in_flight=12)
    h.kv.fail = True
    assert len(await h.tick()) == 1  # the decision is made and logged all the same
    h.kv.fail = False
    await h.tick()
    assert [w[1]["desired"] for w in h.kv.writes] == [3]


async def test_pairs_seen_in_discovery_get_the_default_policy_until_one_is_stored() -> None:
    h = Harness(pairs=(("seen", "prefill"),))
    h.observe("seen", "prefill", ready=0)
    [decision] = await h.tick()
    assert (decision.model, decision.tier, decision.desired) == ("seen", "prefill", 1)  # min 1
    h.store.stored = [Policy(model="seen", tier="prefill", min_replicas=0, scale_down_delay_s=0)]
    [decision] = await h.tick()
    assert decision.inputs["min_replicas"] == 0
    assert decision.desired == 0


async def test_a_deleted_policy_reverts_to_the_default_and_the_pair_is_kept() -> None:
    h = Harness(dataclasses.replace(DECODE, min_replicas=3))
    h.observe("m", "decode", ready=3)
    [decision] = await h.tick()
    assert decision.desired == 3
    h.store.stored = []
    [decision] = await h.tick()
    assert decision.inputs["min_replicas"] == 1  # the default policy's


async def test_decisions_of_several_pairs_newest_first_filtered_and_limited() -> None:
    h = Harness(DECODE, Policy(model="other", tier="prefill"))
    for _ in range(3):
        await h.tick()
    assert len(h.log.recent()) == 6
    mine = h.log.recent(model="m")
    assert [d.model for d in mine] == ["m"] * 3
    assert [d.time for d in mine] == [1010.0, 1005.0, 1000.0]
    assert len(h.log.recent(limit=2)) == 2
    assert len(h.log.recent(limit=0)) == 6  # 0: the default limit


def test_the_decision_log_is_bounded_and_caps_the_limit() -> None:
    log = DecisionLog(maxlen=1500)
    for i in range(2000):
        log.append(Decision(float(i), "m", "decode", 1, 1, "r", {}))
    assert len(log.recent(limit=5000)) == 1000
    assert log.recent(limit=1)[0].time == 1999.0
    assert len(log.recent(limit=0)) == 50


async def test_an_unreadable_store_skips_the_tick() -> None:
    h = Harness(DECODE)
    h.store.fail = True
    assert await h.tick() == []
    assert h.log.recent() == [] and h.kv.writes == []


def test_tick_s_must_be_positive() -> None:
    with pytest.raises(ValueError, match="tick_s"):
        AutoscalerLoop(FakeStore(), FakeObserver(), DecisionLog(), FakeKv(), tick_s=0)
