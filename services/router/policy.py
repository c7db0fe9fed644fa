"""Choosing a worker: cache-aware by default, with load-aware, round-robin and random to compare.

Cache-aware cost of sending a prompt to a candidate (lower wins):

    cost = overlap_weight * new_tokens + load_tokens

- `new_tokens`: prompt tokens the candidate would still compute (prefill) or receive and
  compute (decode) — the prompt minus the leading blocks the prefix index says it holds;
- `load_tokens`: work already queued there, in tokens. Prefill: the prompt tokens it is still
  prefilling (the router's own count, immediate, or the worker's report, whichever is larger).
  Decode: `decode_request_tokens` per request it is running or has queued.

Equal costs (a cold prompt on idle workers) go to the candidate holding the least indexed
context, so new prefixes spread over the workers.

**Bounded load.** Before costs are compared, a candidate may take the request only while its
requests in flight stay within `ceil((1 + balance_slack) * (all in flight + 1) / candidates)`
(consistent hashing with bounded loads) or within `balance_abs` of the least loaded candidate,
whichever is more: a hot prefix spreads over more workers once its holder is that much busier
than the others, instead of queueing without bound on one, while a few requests more than the
average (common at low load, where the relative bound alone would scatter prefixes) do not
count. The least loaded candidate always fits, so some candidate is always eligible.

Every decision is explainable: `Decision.candidates` holds each candidate's numbers, the router
logs them at debug level and `Generation.ExplainRoute` returns them.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvmesh.kv.hashing import BlockHash
from services.router.index import PrefixIndex
from services.router.pool import Worker

POLICIES = ("cache_aware", "load", "round_robin", "random")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    policy: str = "cache_aware"
    overlap_weight: float = 1.0
    balance_slack: float = 0.5
    balance_abs: int = 4
    decode_request_tokens: int = 64
    seed: int | None = None  # the random policy's

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown routing policy {self.policy!r}; one of {POLICIES}")
        knobs = (self.overlap_weight, self.balance_slack, self.balance_abs)
        if min(knobs) < 0 or self.decode_request_tokens < 0:
            raise ValueError(
                "overlap_weight, balance_slack, balance_abs and decode_request_tokens must be >= 0"
            )


@dataclass(slots=True)
class Candidate:
    worker: Worker
    cached_blocks: int
    new_tokens: int
    load_tokens: int
    in_flight: int
    cost: float = 0.0
    eligible: bool = True
    chosen: bool = False


@dataclass(slots=True)
class Decision:
    tier: str
    policy: str
    candidates: list[Candidate] = field(default_factory=list)
    reason: str = ""

    @property
    def chosen(self) -> Candidate | None:
        return next((c for c in self.candidates if c.chosen), None)

    def summary(self) -> list[dict[str, object]]:
        """The candidates as a log line shows them."""
        return [
            {
                "worker_id": c.worker.worker_id,
                "cached_blocks": c.cached_blocks,
                "new_tokens": c.new_tokens,
                "load_tokens": c.load_tokens,
                "in_flight": c.in_flight,
                "cost": round(c.cost, 1),
                "eligible": c.eligible,
                "chosen": c.chosen,
            }
            for c in self.candidates
        ]


class Router:
    """Scores candidates of one tier for one prompt and picks one, by the configured policy."""

    def __init__(self, config: PolicyConfig, index: PrefixIndex) -> None:
        self.config = config
        self.index = index
        self._turn = {"prefill": itertools.count(), "decode": itertools.count()}
        self._random = random.Random(config.seed)

    def choose(
        self,
        tier: str,
        workers: Sequence[Worker],
        hashes: Sequence[BlockHash],
        prompt_tokens: int,
        block_size: int,
    ) -> Decision:
        """Score `workers` (already filtered: ready, not excluded) and mark one chosen."""
        decision = Decision(tier, self.config.policy)
        if not workers:
            decision.reason = "no candidate"
            return decision
        overlap = self.index.overlap(hashes, [w.worker_id for w in workers])
        for worker in sorted(workers, key=lambda w: w.worker_id):
            cached = overlap[worker.worker_id]
            decision.candidates.append(
                Candidate(
                    worker=worker,
                    cached_blocks=cached,
                    new_tokens=max(0, prompt_tokens - cached * block_size),
                    load_tokens=self._load_tokens(tier, worker),
                    in_flight=worker.in_flight,
                )
            )
        self._mark_eligible(decision.candidates)
        policy = self.config.policy
        if policy == "cache_aware":
            weight = self.config.overlap_weight
            for c in decision.candidates:
                c.cost = weight * c.new_tokens + c.load_tokens
            pool = [c for c in decision.candidates if c.eligible]
            # Ties (a cold prompt on idle workers) go to the worker holding the least context:
            # prefixes spread, and with them the requests that will follow them.
            footprint = self.index.footprint
            best = min(pool, key=lambda c: (c.cost, c.in_flight, footprint(c.worker.worker_id)))
            decision.reason = _reason(best, decision.candidates)
        elif policy == "load":
            for c in decision.candidates:
                queued = c.worker.load.num_running + c.worker.load.num_waiting
                c.cost = c.in_flight + queued
            best = min(decision.candidates, key=lambda c: (c.cost, c.load_tokens))
            decision.reason = "least loaded"
        elif policy == "round_robin":
            best = decision.candidates[next(self._turn[tier]) % len(decision.candidates)]
            decision.reason = "round robin"
        else:
            best = self._random.choice(decision.candidates)
            decision.reason = "random"
        best.chosen = True
        return decision

    def _load_tokens(self, tier: str, worker: Worker) -> int:
        report = worker.load
        if tier == "prefill":
            return max(worker.pending_tokens, int(report.num_prefill_tokens_pending))
        queued = max(worker.in_flight, report.num_running + report.num_waiting)
        return queued * self.config.decode_request_tokens

    def _mark_eligible(self, candidates: list[Candidate]) -> None:
        total = sum(c.in_flight for c in candidates)
        cap = math.ceil((1 + self.config.balance_slack) * (total + 1) / len(candidates))
        cap = max(cap, min(c.in_flight for c in candidates) + self.config.balance_abs)
        for c in candidates:
            c.eligible = c.in_flight + 1 <= cap
        if not any(c.eligible for c in candidates):  # cannot happen (see module doc); be safe
            for c in candidates:
                c.eligible = True


def _reason(best: Candidate, candidates: list[Candidate]) -> str:
    if any(not c.eligible and c.cached_blocks > best.cached_blocks for c in candidates):
        return "bounded load: the best-cached worker is too busy"
    if best.cached_blocks and best.cached_blocks >= max(c.cached_blocks for c in candidates):
        return "prefix hit"
    if best.cached_blocks:
        return "partial prefix hit, less loaded"
    return "least work"
