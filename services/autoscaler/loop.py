"""The autoscaler's tick loop: observe each (model, tier), decide, record, publish.

Every `tick_s` the loop works out which (model, tier) pairs to size — every stored policy, every
pair a `PairSource` reports (the tiers that have replicas in discovery, sized by the default
policy until an operator stores one), and every pair it has sized before, so that a tier that
lost all its replicas is still woken and a deleted policy reverts to the default — then for each:

    Observer.observe(model, tier) -> Scaler.tick -> DecisionLog, log line, gauges
    -> Consul KV `kvmesh/autoscaler/desired/<model>/<tier>` when the desired count changed

The loop only asks; the control plane reads the desired keys and adds or drains replicas.
Registry failures skip what they touch for one tick and are retried on the next.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import structlog

from kvmesh.discovery import DiscoveryError
from kvmesh.discovery.keys import DESIRED_PREFIX
from kvmesh.errors import InvalidRequestError
from kvmesh.telemetry import metrics
from services.autoscaler.decide import Decision, Observation, Scaler
from services.autoscaler.policy import Policy

log = structlog.get_logger(__name__)

REPUBLISH_S = 30.0  # desired counts are written again this often, changed or not

DEFAULT_TICK_S = 5.0
DEFAULT_DECISIONS_KEPT = 10_000
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 1000

Pair = tuple[str, str]  # (model, tier)


class Observer(Protocol):
    """What the loop reads about one (model, tier) each tick."""

    async def observe(self, model: str, tier: str) -> Observation: ...


class PairSource(Protocol):
    """The (model, tier) pairs that exist in the cluster, whether or not a policy is stored."""

    async def pairs(self) -> set[Pair]: ...


class PolicySource(Protocol):
    """The part of `PolicyStore` the loop uses; a protocol so that unit tests need no registry."""

    async def policies(self) -> list[Policy]: ...


class KvWriter(Protocol):
    """The part of `Discovery` that publishes desired counts."""

    async def kv_put(self, key: str, value: bytes | str) -> bool: ...


class DecisionLog:
    """The most recent decisions in memory, newest first, for `ListDecisions`.

    Bounded so that a long-running autoscaler with many models does not grow without limit;
    the full history is in the logs.
    """

    def __init__(self, maxlen: int = DEFAULT_DECISIONS_KEPT) -> None:
        self._decisions: deque[Decision] = deque(maxlen=maxlen)

    def append(self, decision: Decision) -> None:
        self._decisions.appendleft(decision)

    def recent(self, model: str = "", limit: int = DEFAULT_LIST_LIMIT) -> list[Decision]:
        """Up to `limit` newest decisions, of `model` only when it is not empty. `limit` 0
        means the default; anything above `MAX_LIST_LIMIT` is capped."""
        limit = min(limit or DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)
        found: list[Decision] = []
        for decision in self._decisions:
            if len(found) >= limit:
                break
            if not model or decision.model == model:
                found.append(decision)
        return found


class AutoscalerLoop:
    """One `Scaler` per (model, tier), created on first use and kept for the process's life."""

    def __init__(
        self,
        store: PolicySource,
        observer: Observer,
        decisions: DecisionLog,
        publisher: KvWriter,
        *,
        pair_source: PairSource | None = None,
        tick_s: float = DEFAULT_TICK_S,
        clock: Callable[[], float] = time.time,
        desired_prefix: str = DESIRED_PREFIX,
    ) -> None:
        if tick_s <= 0:
            raise ValueError(f"tick_s must be positive, not {tick_s}")
        self._store = store
        self._observer = observer
        self._decisions = decisions
        self._publisher = publisher
        self._pair_source = pair_source
        self._tick_s = tick_s
        self._clock = clock
        self._prefix = desired_prefix if desired_prefix.endswith("/") else desired_prefix + "/"
        self._scalers: dict[Pair, Scaler] = {}
        self._published: dict[Pair, tuple[int, float]] = {}  # desired count written, when

    def desired_key(self, model: str, tier: str) -> str:
        return f"{self._prefix}{model}/{tier}"

    async def run(self) -> None:
        """Tick until cancelled. A tick that fails unexpectedly is logged and the loop goes on:
        one bad round must not leave every tier unsized."""
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("autoscaler tick failed")
            await asyncio.sleep(self._tick_s)

    async def tick(self) -> list[Decision]:
        """One round over every pair; returns its decisions (in pair order)."""
        policies = await self._policies()
        if policies is None:
            return []
        made: list[Decision] = []
        for pair in sorted(policies):
            decision = await self._decide(policies[pair])
            if decision is not None:
                made.append(decision)
        return made

    async def _policies(self) -> dict[Pair, Policy] | None:
        """The policy of every pair to size this tick; None when the store cannot be read,
        since sizing with defaults would undo what operators stored."""
        try:
            stored = await self._store.policies()
            seen = await self._pair_source.pairs() if self._pair_source is not None else set()
        except DiscoveryError as e:
            log.warning("autoscaler tick skipped: registry unavailable", error=str(e))
            return None
        policies: dict[Pair, Policy] = {}
        for model, tier in set(self._scalers) | seen:
            default = Policy(model=model, tier=tier)
            try:
                default.validate()
            except InvalidRequestError as e:  # a model name no policy key can hold
                log.warning("autoscaler pair ignored", model=model, tier=tier, error=str(e))
                continue
            policies[(model, tier)] = default
        policies |= {(p.model, p.tier): p for p in stored}
        return policies

    async def _decide(self, policy: Policy) -> Decision | None:
        pair = (policy.model, policy.tier)
        try:
            observation = await self._observer.observe(*pair)
        except DiscoveryError as e:
            log.warning("autoscaler observation failed", model=pair[0], tier=pair[1], error=str(e))
            return None
        scaler = self._scalers.get(pair)
        if scaler is None:
            scaler = self._scalers[pair] = Scaler(policy, clock=self._clock)
        elif scaler.policy != policy:
            scaler.set_policy(policy)
            log.info("autoscaler policy applied", model=pair[0], tier=pair[1])
        decision = scaler.tick(observation)
        self._decisions.append(decision)
        log.info(
            "autoscaler decision",
            model=decision.model,
            tier=decision.tier,
            current=decision.current,
            desired=decision.desired,
            reason=decision.reason,
        )
        metrics.AUTOSCALER_DESIRED_REPLICAS.labels(*pair).set(decision.desired)
        metrics.AUTOSCALER_ACTUAL_REPLICAS.labels(*pair).set(decision.current)
        await self._publish(decision)
        return decision

    async def _publish(self, decision: Decision) -> None:
        """Write the desired count when it changed, and again every REPUBLISH_S even if not
        (a registry that restarted without its data has lost it); a failed write is retried
        next tick."""
        pair = (decision.model, decision.tier)
        published = self._published.get(pair)
        now = self._clock()
        unchanged = published is not None and published[0] == decision.desired
        if unchanged and published is not None and now - published[1] < REPUBLISH_S:
            return
        value = json.dumps(
            {"desired": decision.desired, "reason": decision.reason, "time": decision.time}
        )
        try:
            await self._publisher.kv_put(self.desired_key(*pair), value)
        except DiscoveryError as e:
            log.warning(
                "autoscaler desired not published", model=pair[0], tier=pair[1], error=str(e)
            )
            return
        self._published[pair] = (decision.desired, now)
