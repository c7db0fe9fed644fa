"""What a routing decision costs with a large prefix index, and what the index weighs.

    python -m services.router.bench_index                 # (`kvmesh bench-router` runs this)

1. Fill the index the way KV events do (`stored` per worker) with `prefixes` cached prefixes of
   `prefix_tokens` tokens each, spread over `workers` workers; measure the memory it takes
   (tracemalloc) and how fast events apply.
2. Time decisions: a prompt (an indexed prefix plus a new question, or a miss) is hashed and every
   worker scored by the cache-aware policy, as the router does per request; p50 / p99.
3. Boundedness: each worker is given an LRU cache of `capacity_blocks`; `churn` more prefixes
   arrive and every eviction is a `removed` event. The index never holds more than the workers'
   caches do, and ends at most at their total capacity.
"""

from __future__ import annotations

import json
import random
import time
import tracemalloc
from collections import OrderedDict
from typing import Any

import click

from kvmesh.kv.hashing import BlockHash, hash_blocks, root_hash
from services.router.index import PrefixIndex
from services.router.policy import PolicyConfig, Router
from services.router.pool import Worker


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(
    *,
    prefixes: int = 10_000,
    prefix_tokens: int = 512,
    question_tokens: int = 32,
    workers: int = 8,
    block_size: int = 16,
    decisions: int = 5_000,
    capacity_blocks: int = 20_000,
    churn: int = 20_000,
    seed: int = 0,
) -> dict[str, Any]:
    rng = random.Random(seed)
    root = root_hash("bench-model")
    names = [f"prefill-{i}" for i in range(workers)]

    def prefix_tokens_of(i: int) -> list[int]:
        return [100 + (i * 7919 + j * 31) % 48_000 for j in range(prefix_tokens)]

    prefix_hashes = [hash_blocks(prefix_tokens_of(i), block_size, root) for i in range(prefixes)]

    # 1. fill, as events would
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    index = PrefixIndex()
    for name in names:
        index.reset(name, [], last_event_id=0)
    started = time.perf_counter()
    for i, hashes in enumerate(prefix_hashes):
        index.stored(names[i % workers], i + 1, hashes)
    fill_s = time.perf_counter() - started
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    index_bytes = sum(s.size_diff for s in after.compare_to(before, "filename"))

    # 2. decisions
    channel: Any = None
    pool = [Worker(name, "prefill", f"127.0.0.1:{i}", channel) for i, name in enumerate(names)]
    router = Router(PolicyConfig(), index)
    hash_s: list[float] = []
    choose_s: list[float] = []
    hits = 0
    for n in range(decisions):
        if n % 10 == 9:  # one in ten is a prefix nobody holds
            base = prefix_tokens_of(prefixes + n)
        else:
            base = prefix_tokens_of(rng.randrange(prefixes))
        prompt = base + [rng.randrange(100, 48_000) for _ in range(question_tokens)]
        t0 = time.perf_counter()
        hashes = hash_blocks(prompt, block_size, root)
        t1 = time.perf_counter()
        decision = router.choose("prefill", pool, hashes, len(prompt), block_size)
        t2 = time.perf_counter()
        hash_s.append(t1 - t0)
        choose_s.append(t2 - t1)
        chosen = decision.chosen
        hits += bool(chosen and chosen.cached_blocks)
    total_s = [a + b for a, b in zip(hash_s, choose_s, strict=True)]

    # 3. bounded under eviction
    caches: dict[str, OrderedDict[BlockHash, None]] = {name: OrderedDict() for name in names}
    bounded = PrefixIndex()
    event_id = 0
    for name in names:
        bounded.reset(name, [], last_event_id=0)
    peak = 0
    for i in range(prefixes + churn):
        name = names[rng.randrange(workers)]
        cache = caches[name]
        if i < prefixes:
            hashes = prefix_hashes[i]
        else:
            hashes = hash_blocks(prefix_tokens_of(prefixes * 2 + i), block_size, root)
        event_id += 1
        bounded.stored(name, event_id, hashes)
        for h in hashes:
            cache[h] = None
            cache.move_to_end(h)
        evicted = []
        while len(cache) > capacity_blocks:
            evicted.append(cache.popitem(last=False)[0])
        if evicted:
            event_id += 1
            bounded.removed(name, event_id, evicted)
        peak = max(peak, bounded.num_entries)
    held = sum(len(c) for c in caches.values())

    return {
        "prefixes": prefixes,
        "prefix_tokens": prefix_tokens,
        "workers": workers,
        "block_size": block_size,
        "index_entries": index.num_entries,
        "index_blocks": index.num_blocks,
        "index_bytes": index_bytes,
        "index_bytes_per_entry": round(index_bytes / max(1, index.num_entries), 1),
        "events_applied_per_s": round(prefixes / fill_s),
        "blocks_applied_per_s": round(index.num_entries / fill_s),
        "decisions": decisions,
        "prompt_tokens": prefix_tokens + question_tokens,
        "decision_hit_fraction": round(hits / decisions, 3),
        "hash_us_p50": round(_percentile(hash_s, 0.5) * 1e6, 1),
        "score_us_p50": round(_percentile(choose_s, 0.5) * 1e6, 1),
        "decision_us_p50": round(_percentile(total_s, 0.5) * 1e6, 1),
        "decision_us_p99": round(_percentile(total_s, 0.99) * 1e6, 1),
        "bounded": {
            "capacity_blocks_per_worker": capacity_blocks,
            "prefixes_inserted": prefixes + churn,
            "peak_entries": peak,
            "final_entries": bounded.num_entries,
            "blocks_held_by_workers": held,
            # A worker's cache may overshoot by one prefix between a store and its evictions.
            "within_capacity": peak <= workers * capacity_blocks + prefix_tokens // block_size,
            "index_equals_caches": bounded.num_entries == held,
        },
    }


@click.command()
@click.option("--prefixes", default=10_000, show_default=True)
@click.option("--prefix-tokens", default=512, show_default=True)
@click.option("--workers", default=8, show_default=True)
@click.option("--decisions", default=5_000, show_default=True)
@click.option("--capacity-blocks", default=20_000, show_default=True, help="per worker")
@click.option("--churn", default=20_000, show_default=True, help="prefixes after the fill")
def main(
    prefixes: int,
    prefix_tokens: int,
    workers: int,
    decisions: int,
    capacity_blocks: int,
    churn: int,
) -> None:
    """Routing decision time and the prefix index's memory, with many prefixes indexed."""
    if min(prefixes, prefix_tokens, workers, decisions, capacity_blocks) < 1 or churn < 0:
        raise click.BadParameter("counts must be positive")
    report = run(
        prefixes=prefixes,
        prefix_tokens=prefix_tokens,
        workers=workers,
        decisions=decisions,
        capacity_blocks=capacity_blocks,
        churn=churn,
    )
    click.echo(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
