"""Choosing a worker: cost = overlap_weight x tokens to compute + load, under bounded load."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from kvmesh.api.v1 import worker_pb2
from kvmesh.kv.hashing import BlockHash, hash_blocks, root_hash
from services.router.index import PrefixIndex
from services.router.policy import PolicyConfig, Router
from services.router.pool import Worker

BLOCK = 16
PROMPT = list(range(100, 100 + 8 * BLOCK))  # 8 full blocks
HASHES = hash_blocks(PROMPT, BLOCK, root_hash("m"))


def _workers(n: int, tier: str = "prefill") -> list[Worker]:
    channel: Any = None
    return [Worker(f"w{i}", tier, f"127.0.0.1:{i}", channel) for i in range(n)]


def _router(policy: str = "cache_aware", **knobs: Any) -> tuple[Router, PrefixIndex]:
    index = PrefixIndex()
    return Router(PolicyConfig(policy=policy, seed=0, **knobs), index), index


def _choose(router: Router, workers: list[Worker], hashes: list[BlockHash] = HASHES) -> str:
    decision = router.choose("prefill", workers, hashes, len(PROMPT), BLOCK)
    assert decision.chosen is not None
    return decision.chosen.worker.worker_id


def test_the_worker_holding_the_prefix_wins_when_loads_are_equal() -> None:
    router, index = _router()
    workers = _workers(3)
    for w in workers:
        index.reset(w.worker_id, [], last_event_id=0)
    index.stored("w2", 1, HASHES[:6])
    decision = router.choose("prefill", workers, HASHES, len(PROMPT), BLOCK)
    assert decision.chosen is not None and decision.chosen.worker.worker_id == "w2"
    assert decision.chosen.cached_blocks == 6
    assert decision.chosen.new_tokens == 2 * BLOCK
    assert decision.reason == "prefix hit"
    summary = {row["worker_id"]: row for row in decision.summary()}
    assert summary["w0"]["new_tokens"] == len(PROMPT)
    assert summary["w2"]["chosen"] is True


def test_load_outweighs_a_small_overlap() -> None:
    router, index = _router()
    workers = _workers(2)
    index.reset("w0", HASHES[:1], last_event_id=0)  # saves 16 tokens
    index.reset("w1", [], last_event_id=0)
    workers[0].pending_tokens = 500  # but is busy with 500 tokens of prefill
    assert _choose(router, workers) == "w1"
    workers[0].pending_tokens = 0
    assert _choose(router, workers) == "w0"


def test_bounded_load_spreads_a_hot_prefix() -> None:
    router, index = _router(balance_slack=0.5, balance_abs=0)
    workers = _workers(3)
    for w in workers:
        index.reset(w.worker_id, [], last_event_id=0)
    index.stored("w0", 1, HASHES)
    placed: Counter[str] = Counter()
    reasons: set[str] = set()
    for _ in range(30):  # requests arrive and stay in flight
        decision = router.choose("prefill", workers, HASHES, len(PROMPT), BLOCK)
        reasons.add(decision.reason)
        chosen = decision.chosen
        assert chosen is not None
        chosen.worker.in_flight += 1
        placed[chosen.worker.worker_id] += 1
    # cap = ceil(1.5 x (in flight + 1) / 3): the holder takes at most about half again the mean.
    assert placed["w0"] <= 16
    assert min(placed.values()) >= 5
    assert "bounded load: the best-cached worker is too busy" in reasons


def test_the_least_loaded_worker_is_always_eligible() -> None:
    router, _ = _router(balance_slack=0.0, balance_abs=0)
    workers = _workers(3)
    for i, w in enumerate(workers):
        w.in_flight = [4, 7, 9][i]
    decision = router.choose("prefill", workers, HASHES, len(PROMPT), BLOCK)
    assert any(c.eligible for c in decision.candidates)
    assert decision.chosen is not None and decision.chosen.worker.worker_id == "w0"


def test_round_robin_and_random_ignore_the_cache() -> None:
    router, index = _router("round_robin")
    workers = _workers(3)
    index.reset("w0", HASHES, last_event_id=0)
    assert [_choose(router, workers) for _ in range(6)] == ["w0", "w1", "w2"] * 2
    router, index = _router("random")
    seen = {_choose(router, workers) for _ in range(50)}
    assert seen == {"w0", "w1", "w2"}


def test_the_load_policy_prefers_fewer_requests() -> None:
    router, _ = _router("load")
    workers = _workers(2, tier="decode")
    workers[0].load = worker_pb2.LoadReport(num_running=3)
    decision = router.choose("decode", workers, HASHES, len(PROMPT), BLOCK)
    assert decision.chosen is not None and decision.chosen.worker.worker_id == "w1"


def test_decode_load_counts_running_requests() -> None:
    router, index = _router(decode_request_tokens=100)
    workers = _workers(2, tier="decode")
    index.reset("w0", HASHES, last_event_id=0)  # saves 128 tokens
    index.reset("w1", [], last_event_id=0)
    workers[0].load = worker_pb2.LoadReport(num_running=2)  # costs 200
    assert (
        router.choose("decode", workers, HASHES, len(PROMPT), BLOCK).chosen.worker.worker_id == "w1"
    )  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "knobs",
    [{"policy": "nope"}, {"overlap_weight": -1.0}, {"balance_slack": -0.1}, {"balance_abs": -1}],
)
def test_bad_knobs_are_rejected(knobs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"policy|must be >= 0"):
        PolicyConfig(**knobs)


def test_cold_prompts_spread_over_idle_workers() -> None:
    router, index = _router()
    workers = _workers(3)
    for w in workers:
        index.reset(w.worker_id, [], last_event_id=0)
    placed = []
    for group in range(6):  # six new prefixes, nothing in flight
        hashes = hash_blocks([group, *PROMPT[1:]], BLOCK, root_hash("m"))
        chosen = _choose(router, workers, hashes)
        index.routed(chosen, hashes)
        placed.append(chosen)
    assert Counter(placed) == {"w0": 2, "w1": 2, "w2": 2}


def test_a_few_requests_above_the_mean_keep_a_prefix_on_its_holder() -> None:
    router, index = _router(balance_slack=0.5, balance_abs=4)
    workers = _workers(3)
    for w in workers:
        index.reset(w.worker_id, [], last_event_id=0)
    index.stored("w0", 1, HASHES)
    workers[0].in_flight = 3  # the relative bound alone (cap 2) would send this elsewhere
    assert _choose(router, workers) == "w0"
    workers[0].in_flight = 4  # but not beyond the least loaded + balance_abs
    assert _choose(router, workers) != "w0"
