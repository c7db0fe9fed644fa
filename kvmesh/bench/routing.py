"""`kvmesh bench-routing`: cache-aware routing against round-robin and random, in one mesh.

One mesh — the registry, `num_prefill` prefill workers, `num_decode` decode workers — and one
router per policy on the same workers, every router disaggregating every request (so every
prompt is prefilled on the prefill tier, where the policies differ). The same shared-prefix
workload (`kvmesh.bench.load`) runs through each router in turn with its own seed, so no run
finds another's prefixes cached. Per policy: the prefix hit rate (cached / prompt tokens, as the
prefill workers report them) and its share of the oracle's, TTFT, the router's decision time
(its `kvmesh_router_decision_seconds` histogram), how many requests each prefill worker served,
and the most requests the router had in flight on any prefill worker (sampled from its metrics).

Policies are the router's (`cache_aware`, `round_robin`, `random`) and `approximate`: the
cache-aware router over prefill workers that publish no KV events (`--no-kv-events`), so it
indexes only its own routing decisions (the router has no switch to ignore events it gets). That
run comes last: the prefill workers are replaced by as many started with `--no-kv-events`.

Only one router runs at a time, each started for its run and stopped after: a router follows
every worker's KV events and load, and idle routers would take the CPU the workers need (with
dozens of sim workers on two cores, that matters). A fresh router rebuilds its exact index from
the workers' snapshots.

The oracle's hit rate is computed, not run: every request of a group on a worker that holds the
group's system prompt, so each group misses once and hits its full system-prompt blocks after.

Then, with the cache-aware router:
- skew: the groups' popularity Zipf-distributed — the busiest worker must not queue without bound;
- robustness: prefill worker 0 is SIGKILLed a quarter of the way in and a replacement started at
  once (it serves after loading the model), one that publishes no KV events (so the router
  indexes it approximately and says so); hit rate per phase.

`--engine sim` runs the same on simulated workers (`kvmesh.engine.sim`: an H100's timing for
Llama-3.1-8B's shape, no torch), so 32 prefill and 32 decode workers fit on a laptop; its
defaults (`SIM_DEFAULTS`) scale the workload so 32 prefill workers matter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvmesh.bench import load
from kvmesh.engine.config import EngineConfig
from kvmesh.process import stop_child
from kvmesh.telemetry.scrape import scrape, total
from kvmesh.up import Child, Mesh, UpConfig

APPROXIMATE = "approximate"  # the cache-aware router over workers without KV events
POLICIES = ("cache_aware", APPROXIMATE, "round_robin", "random")
DEFAULT_POLICIES = ("cache_aware", "round_robin", "random")
_QUEUE_SAMPLE_S = 0.25
_READY_POLL_S = 0.2
_READY_TIMEOUT_S = 300.0


# Sized for a 2-core machine: SGLang bench_serving's generated-shared-prefix shape, smaller.
SMALL_SHARED_PREFIX = load.SharedPrefix(
    groups=8, prompts_per_group=8, system_prompt_len=512, question_len=32, output_len=16
)


# Sized so 32 prefill workers matter on a 2-core machine: 64 groups (two per worker for the
# oracle) with a 1024-token system prompt; the sim runs 20x slower than an H100 so the GPU's
# time, not this machine's CPU, dominates TTFT (a miss prefills in ~0.5 s, a hit in ~0.15 s).
SIM_SHARED_PREFIX = load.SharedPrefix(
    groups=64, prompts_per_group=8, system_prompt_len=1024, question_len=32, output_len=16
)
SIM_DEFAULTS: dict[str, Any] = {
    **{f.name: getattr(SIM_SHARED_PREFIX, f.name) for f in dataclasses.fields(SIM_SHARED_PREFIX)},
    "rate": 8.0,
    "policies": ("cache_aware", APPROXIMATE, "round_robin"),
    "model": "dummy:llama-3.1-8b",
    "engine_args": ("gpu=H100", "speed=0.05"),
    "num_blocks": None,  # the sim sizes its pool from the GPU's memory
}


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
    num_blocks: int | None = 1024  # None: the engine sizes its pool
    seed: int = 0
    policies: tuple[str, ...] = DEFAULT_POLICIES
    robustness: bool = True
    num_decode: int = 1
    engine: str = EngineConfig().engine
    model: str | None = None  # None: smollm2 (torch), SIM_DEFAULTS' (sim)
    engine_args: tuple[str, ...] = ()  # --engine-arg KEY=VALUE for every worker

    @property
    def model_spec(self) -> str:
        if self.model is not None:
            return self.model
        return str(SIM_DEFAULTS["model"]) if self.engine == "sim" else UpConfig().model

    @property
    def speed(self) -> float:
        """The sim's speed (wall time x speed = the modeled GPU's time); 1 for real engines."""
        if self.engine != "sim":
            return 1.0
        speeds = [a.partition("=")[2] for a in self.engine_args if a.startswith("speed=")]
        return float(speeds[-1]) if speeds else 1.0


async def run(bench: RoutingBench) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="kvmesh-bench-routing-"))
    exact = [p for p in bench.policies if p != APPROXIMATE]
    config = UpConfig(
        model=bench.model_spec, num_prefill=bench.num_prefill, num_decode=bench.num_decode,
        registry_port=0, router_port=0, edge_port=0, disagg_min_tokens=0, device="cpu",
        log_dir=log_dir, extra_worker_args=_worker_args(bench),
        extra_router_args=["--policy", exact[0] if exact else "cache_aware"],
    )  # fmt: skip
    mesh = Mesh(config)
    report: dict[str, Any] = {
        "config": dataclasses.asdict(bench),
        "oracle_hit_rate": round(oracle_hit_rate(bench.workload, bench.block_size), 4),
        "logs": str(log_dir),
    }
    if bench.speed != 1.0:
        report["speed"] = bench.speed  # the sim's: wall time x speed = the modeled GPU's time
    started = time.monotonic()
    try:
        await mesh.start()
        report["mesh_start_s"] = round(time.monotonic() - started, 1)
        runs: dict[str, Any] = {}
        for i, policy in enumerate(exact):
            router = mesh.router_address if i == 0 else await _add_router(mesh, policy, policy)
            seed = bench.policies.index(policy)
            runs[policy] = await _measure(mesh, router, bench.workload, bench, seed, stop=True)
        next_seed = len(bench.policies)
        if bench.zipf > 0:
            skewed = dataclasses.replace(bench.workload, zipf=bench.zipf)
            router = await _add_router(mesh, "zipf", "cache_aware")
            report["zipf"] = await _measure(mesh, router, skewed, bench, next_seed, stop=True)
        if bench.robustness:
            router = await _add_router(mesh, "robustness", "cache_aware")
            report["robustness"] = await _robustness(mesh, router, bench, next_seed + 1)
            await stop_child(router_of(mesh, router), mesh.config.grace_s)
        if APPROXIMATE in bench.policies:
            await _replace_prefill_workers(mesh, bench.num_prefill, ["--no-kv-events"])
            router = await _add_router(mesh, APPROXIMATE, "cache_aware")
            seed = bench.policies.index(APPROXIMATE)
            runs[APPROXIMATE] = await _measure(mesh, router, bench.workload, bench, seed, stop=True)
        report["policies"] = {policy: runs[policy] for policy in bench.policies}
    finally:
        await mesh.stop()
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    return report


def _worker_args(bench: RoutingBench) -> list[str]:
    args = [] if bench.num_blocks is None else ["--num-blocks", str(bench.num_blocks)]
    args += ["--block-size", str(bench.block_size), "--ttl-s", "1"]
    if bench.engine != "torch":
        args += ["--engine", bench.engine]
    for arg in bench.engine_args:
        args += ["--engine-arg", arg]
    return args


async def _add_router(mesh: Mesh, name: str, policy: str) -> str:
    return await mesh.add_router(f"router-{name}", ["--policy", policy])


async def _replace_prefill_workers(mesh: Mesh, count: int, args: Sequence[str]) -> None:
    """Stop every prefill worker, then start `count` new ones with `args`, all at once."""
    await asyncio.gather(*(stop_child(c, mesh.config.grace_s) for c in mesh.workers("prefill")))
    await asyncio.gather(
        *(mesh.add_worker("prefill", f"prefill-{APPROXIMATE}-{i}", args) for i in range(count))
    )


async def _wait_for_workers(router: Child, count: int) -> None:
    """Until the router follows `count` workers' KV (exactly, or approximately without events)."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        samples = await scrape(router.metrics_port)
        if sum(key.startswith("kvmesh_router_kv_index_exact{") for key in samples) >= count:
            return
        await asyncio.sleep(_READY_POLL_S)  # polling the router's /metrics for readiness
    raise RuntimeError(f"{router.name} did not find {count} workers in time")


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
    mesh: Mesh,
    router: str,
    workload: load.SharedPrefix,
    bench: RoutingBench,
    seed: int,
    *,
    stop: bool = False,
) -> dict[str, Any]:
    """Run the workload through `router` (stopped after, with `stop`) and summarize it."""
    child = router_of(mesh, router)
    await _wait_for_workers(child, len(mesh.workers("prefill")) + len(mesh.workers("decode")))
    before = await requests_served(mesh.workers("prefill"), "kvmesh.v1.Prefill")
    decisions_before = await scrape(child.metrics_port)
    queues: dict[str, int] = {}
    sampler = asyncio.create_task(_sample_queues(child, queues))
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
    decisions_after = await scrape(child.metrics_port)
    if stop:
        await stop_child(child, mesh.config.grace_s)
    served = {worker: n - before.get(worker, 0) for worker, n in after.items()}
    summary = _summary(result, served, queues)
    oracle = oracle_hit_rate(workload, bench.block_size)
    if summary["prefix_hit_rate"] is not None and oracle > 0:
        summary["hit_rate_over_oracle"] = round(summary["prefix_hit_rate"] / oracle, 4)
    if bench.speed != 1.0:  # the sim's wall time, scaled back to the modeled GPU's
        for key in ("ttft_p50_ms", "ttft_p90_ms", "e2e_p50_ms"):
            if summary[key] is not None:
                summary[key.replace("_ms", "_ms_gpu_time")] = summary[key] * bench.speed
    summary["router_decision_us"] = {
        tier: decision_time_us(decisions_before, decisions_after, tier)
        for tier in ("prefill", "decode")
    }
    return summary


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


_DECISION = "kvmesh_router_decision_seconds"
_LE = re.compile(r'le="([^"]+)"')


def decision_time_us(
    before: dict[str, float], after: dict[str, float], tier: str
) -> dict[str, float | int | None]:
    """The router's decision time for `tier` between two scrapes: count, mean, and p50 / p90
    interpolated within the histogram's buckets (as Prometheus' histogram_quantile does)."""
    label = f'tier="{tier}"'

    def delta(name: str) -> float:
        return total(after, name, containing=label) - total(before, name, containing=label)

    count = int(delta(f"{_DECISION}_count"))
    buckets: dict[float, float] = {}
    for key, value in after.items():
        match = _LE.search(key)
        if key.startswith(f"{_DECISION}_bucket{{") and label in key and match:
            buckets[float(match[1])] = value - before.get(key, 0.0)
    bounds = sorted(buckets)

    def quantile(q: float) -> float | None:
        if count == 0:
            return None
        rank, lower, below = q * count, 0.0, 0.0
        for bound in bounds:
            if buckets[bound] >= rank:
                if math.isinf(bound):
                    return lower * 1e6  # beyond the last finite bucket: its bound, a floor
                share = (rank - below) / max(buckets[bound] - below, 1e-12)
                return (lower + (bound - lower) * share) * 1e6
            lower, below = bound, buckets[bound]
        return None

    mean = delta(f"{_DECISION}_sum") / count * 1e6 if count else None
    p50, p90 = quantile(0.5), quantile(0.9)
    return {
        "count": count,
        "mean": None if mean is None else round(mean, 1),
        "p50": None if p50 is None else round(p50, 1),
        "p90": None if p90 is None else round(p90, 1),
    }


def render_table(report: dict[str, Any]) -> str:
    """Per policy: hit rate (and its share of the oracle's), TTFT, the router's decision time."""
    speed = report.get("speed", 1.0) != 1.0
    header = ["policy", "hit rate", "/ oracle", "TTFT p50 ms", "TTFT p90 ms"]
    if speed:
        header += ["p50 GPU ms", "p90 GPU ms"]
    header += ["decide mean us", "p50 us", "p90 us", "errors"]
    rows = [header]
    for policy, run in report.get("policies", {}).items():
        decision = run["router_decision_us"]["prefill"]
        row = [
            policy,
            _fmt(run["prefix_hit_rate"], "{:.3f}"),
            _fmt(run.get("hit_rate_over_oracle"), "{:.0%}"),
            _fmt(run["ttft_p50_ms"], "{:.0f}"),
            _fmt(run["ttft_p90_ms"], "{:.0f}"),
        ]
        if speed:
            row += [
                _fmt(run.get("ttft_p50_ms_gpu_time"), "{:.1f}"),
                _fmt(run.get("ttft_p90_ms_gpu_time"), "{:.1f}"),
            ]
        row += [_fmt(decision[k], "{:.0f}") for k in ("mean", "p50", "p90")]
        row.append(str(run["errors"]))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]  # fmt: skip
    lines.append(
        f"oracle hit rate {report['oracle_hit_rate']:.3f}; decision time: the prefill tier's, "
        "p50/p90 interpolated within the histogram's buckets (x3 apart)"
    )
    if speed:
        lines.append(f"GPU ms: wall ms x speed {report['speed']} (the sim's modeled GPU time)")
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


async def _robustness(mesh: Mesh, router: str, bench: RoutingBench, seed: int) -> dict[str, Any]:
    """Kill prefill-0 a quarter of the way in and start a replacement without KV events."""
    n = bench.workload.groups * bench.workload.prompts_per_group
    duration = n / bench.rate
    victim = mesh.child("prefill-0")
    workers = len(mesh.workers("prefill")) + len(mesh.workers("decode"))
    await _wait_for_workers(router_of(mesh, router), workers)
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
