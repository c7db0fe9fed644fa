"""`kvmesh bench-routing`: cache-aware routing against round-robin and random, in one mesh.

One mesh — the registry, `prefill` prefill workers, one decode worker — and one router per
policy on the same workers, every router disaggregating every request (so every prompt is
prefilled on the prefill tier, where the policies differ). The same shared-prefix workload
(`kvmesh.bench.load`) runs through each router in turn with its own seed, so no run finds
another's prefixes cached. Per policy: the prefix hit rate (cached / prompt tokens, as the
prefill workers report them), TTFT, how many requests each prefill worker served, and the
most requests the router had in flight on any prefill worker (sampled from its metrics).

The oracle's hit rate is computed, not run: every request of a group on a worker that holds the
group's system prompt, so each group misses once and hits its full system-prompt blocks after.

Then, with the cache-aware router:
- skew: the groups' popularity Zipf-distributed — the busiest worker must not queue without bound;
- robustness: prefill worker 0 is SIGKILLed a quarter of the way in and a replacement started at
  once (it serves after loading the model), one that publishes no KV events (so the router
  indexes it approximately and says so); hit rate per phase.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvmesh.bench import load
from kvmesh.telemetry.scrape import scrape, total
from kvmesh.up import Child, Mesh, UpConfig

POLICIES = ("cache_aware", "round_robin", "random")
_QUEUE_SAMPLE_S = 0.25


# Sized for a 2-core machine: SGLang bench_serving's generated-shared-prefix shape, smaller.
SMALL_SHARED_PREFIX = load.SharedPrefix(
    groups=8, prompts_per_group=8, system_prompt_len=512, question_len=32, output_len=16
)


def oracle_hit_rate(workload: load.SharedPrefix, block_size: int) -> float:
    """Every request on a worker holding its group's prefix: each group misses once."""
    cached = (workload.system_prompt_len // block_size) * block_size
    prompt = workload.system_prompt_len + workload.question_len
    per_group = workload.prompts_per_group
    return (per_group - 1) * cached / (per_group * prompt)


@dataclasses.dataclass(frozen=True, slots=True)
class RoutingBench:
    workload: load.SharedPrefix = SMALL_SHARED_PREFIX
    rate: float = 1.0
    num_prefill: int = 3
    zipf: float = 1.2
    block_size: int = 16
    num_blocks: int = 1024
    seed: int = 0
    policies: tuple[str, ...] = POLICIES
    robustness: bool = True


async def run(bench: RoutingBench) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="kvmesh-bench-routing-"))
    config = UpConfig(
        num_prefill=bench.num_prefill, num_decode=1, registry_port=0, router_port=0,
        edge_port=0, disagg_min_tokens=0, device="cpu", log_dir=log_dir,
        extra_worker_args=["--num-blocks", str(bench.num_blocks), "--block-size",
                           str(bench.block_size), "--ttl-s", "1"],
        extra_router_args=["--policy", bench.policies[0]],
    )  # fmt: skip
    mesh = Mesh(config)
    report: dict[str, Any] = {
        "config": dataclasses.asdict(bench),
        "oracle_hit_rate": round(oracle_hit_rate(bench.workload, bench.block_size), 4),
        "logs": str(log_dir),
    }
    try:
        await mesh.start()
        routers = {bench.policies[0]: mesh.router_address}
        for policy in bench.policies[1:]:
            routers[policy] = await mesh.add_router(f"router-{policy}", ["--policy", policy])
        runs: dict[str, Any] = {}
        for i, policy in enumerate(bench.policies):
            runs[policy] = await _measure(mesh, routers[policy], bench.workload, bench, i)
        report["policies"] = runs
        cache_aware = routers.get("cache_aware", mesh.router_address)
        next_seed = len(bench.policies)
        if bench.zipf > 0:
            skewed = dataclasses.replace(bench.workload, zipf=bench.zipf)
            report["zipf"] = await _measure(mesh, cache_aware, skewed, bench, next_seed)
        if bench.robustness:
            report["robustness"] = await _robustness(mesh, cache_aware, bench, next_seed + 1)
    finally:
        await mesh.stop()
    return report


async def requests_served(workers: Sequence[Child], service: str) -> dict[str, int]:
    """RPCs of `service` (e.g. "kvmesh.v1.Prefill") each worker has handled, by worker id."""
    served = {}
    for child in workers:
        samples = await scrape(child.metrics_port)
        handled = total(samples, "kvmesh_rpc_server_handled_total", containing=f'"{service}"')
        served[child.worker_id] = int(handled)
    return served


def router_of(mesh: Mesh, address: str) -> Child:
    return next(c for c in mesh.children if c.name.startswith("router") and c.address == address)


async def _sample_queues(router: Child, into: dict[str, int]) -> None:
    """The most requests the router had in flight on each prefill worker, until cancelled.

    The router's count, not the worker's: a prefill worker finishes its requests within a step,
    so its own running/waiting gauges read zero between steps while callers queue in front.
    """
    port = router.metrics_port
    prefix = 'kvmesh_router_worker_in_flight{tier="prefill",worker_id="'
    while True:
        for key, value in (await scrape(port)).items():
            if key.startswith(prefix):
                worker_id = key[len(prefix) : -2]
                into[worker_id] = max(into.get(worker_id, 0), int(value))
        await asyncio.sleep(_QUEUE_SAMPLE_S)  # a sampling period, not a synchronization


async def _measure(
    mesh: Mesh, router: str, workload: load.SharedPrefix, bench: RoutingBench, seed: int
) -> dict[str, Any]:
    before = await requests_served(mesh.workers("prefill"), "kvmesh.v1.Prefill")
    queues: dict[str, int] = {}
    sampler = asyncio.create_task(_sample_queues(router_of(mesh, router), queues))
    try:
        result = await load.run_async(
            load.BenchConfig(
                target=router,
                protocol="grpc",
                workload=workload,
                arrivals=load.OpenLoop(rate=bench.rate),
                seed=bench.seed * 1000 + seed,
                request_timeout_s=600,
            )
        )
    finally:
        sampler.cancel()
    after = await requests_served(mesh.workers("prefill"), "kvmesh.v1.Prefill")
    served = {worker: n - before.get(worker, 0) for worker, n in after.items()}
    return _summary(result, served, queues)


def _summary(
    result: load.BenchResult, served: dict[str, int], queues: dict[str, int]
) -> dict[str, Any]:
    s = result.summary
    counts = list(served.values())
    return {
        "requests": s.num_requests,
        "errors": s.num_errors,
        "prefix_hit_rate": s.prefix_hit_rate,
        "ttft_p50_ms": s.ttft_ms.p50,
        "ttft_p90_ms": s.ttft_ms.p90,
        "e2e_p50_ms": s.e2e_ms.p50,
        "served_per_worker": served,
        "busiest_over_least_busy": max(counts) / max(1, min(counts)) if counts else None,
        "max_in_flight_per_worker": queues,
    }


async def _robustness(mesh: Mesh, router: str, bench: RoutingBench, seed: int) -> dict[str, Any]:
    """Kill prefill-0 a quarter of the way in and start a replacement without KV events."""
    n = bench.workload.groups * bench.workload.prompts_per_group
    duration = n / bench.rate
    victim = mesh.child("prefill-0")
    timeline: dict[str, float] = {}

    async def disturb(started: float) -> None:
        await asyncio.sleep(duration / 4)  # the schedule of the disturbance
        victim.process.send_signal(signal.SIGKILL)
        timeline["killed_s"] = time.monotonic() - started
        await mesh.add_worker("prefill", "prefill-0-replacement", ["--no-kv-events"])
        timeline["replacement_serving_s"] = time.monotonic() - started

    started = time.monotonic()
    disturbance = asyncio.create_task(disturb(started))
    try:
        result = await load.run_async(
            load.BenchConfig(
                target=router,
                protocol="grpc",
                workload=bench.workload,
                arrivals=load.OpenLoop(rate=bench.rate),
                seed=bench.seed * 1000 + seed,
                request_timeout_s=600,
            )
        )
    finally:
        await disturbance
    killed = timeline.get("killed_s", duration)
    back = timeline.get("replacement_serving_s", duration)
    phases = {
        "before_kill": (0.0, killed),
        "worker_down": (killed, back),
        "after_restart": (back, float("inf")),
    }
    by_phase = {}
    for phase, (low, high) in phases.items():
        records = [r for r in result.records if r.ok and low <= r.sent_s < high]
        prompt = sum(r.prompt_tokens or 0 for r in records)
        cached = sum(r.cached_tokens or 0 for r in records)
        by_phase[phase] = {
            "requests": len(records),
            "prefix_hit_rate": round(cached / prompt, 4) if prompt else None,
        }
    samples = await scrape(router_of(mesh, router).metrics_port)
    return {
        "requests": result.summary.num_requests,
        "errors": result.summary.num_errors,
        "timeline_s": {k: round(v, 1) for k, v in timeline.items()},
        "phases": by_phase,
        "router_index_exact_workers": total(samples, "kvmesh_router_kv_index_exact"),
        "router_fallbacks_absent": total(
            samples, "kvmesh_router_kv_index_fallbacks_total", containing='reason="absent"'
        ),
        "router_prefill_retries": total(samples, "kvmesh_router_prefill_retries_total"),
    }
