"""`kvmesh bench-autoscale`: issue 6's must-shows, each in a mesh of its own.

- `step`: one cluster, autoscaled. A low rate, then a step to several times one decode worker's
  capacity, then a trickle. Reports when the autoscaler decided to grow, when the new replica
  served, when the tier shrank again after the scale-down delay, and every failed or truncated
  request (each answer must have exactly `max_tokens` tokens: `ignore_eos`).
- `zero`: decode min 0. The idle tier goes to zero; one request then waits for a replica
  (the router writes the wake key, the autoscaler wakes the tier, the control plane starts a
  worker with the converted weights cached) and succeeds. Reports the cold start.
- `failover`: two clusters (`--clusters us-east,eu-west`), steady load through one edge;
  every worker of us-east is SIGKILLed mid-run. Reports failures and how long requests sent
  after the kill took to be served by eu-west. Then `cordon`: the same with autoscaled
  clusters, us-east cordoned through the control plane mid-run.
- `spillover`: two clusters, home (us-east) saturated. The same load through an edge that
  knows only us-east and through one that may spill to eu-west; TTFT p90 of each against the
  target.

Timings come from the wall clock of this process, which also runs the load: the ratio and
ordering are the result, absolute seconds only on the machine they ran on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from kvmesh import tiers
from kvmesh.api.v1 import (
    autoscaler_pb2,
    autoscaler_pb2_grpc,
    controlplane_pb2,
    controlplane_pb2_grpc,
)
from kvmesh.bench import load
from kvmesh.telemetry.scrape import scrape
from kvmesh.up import Mesh, UpConfig
from kvmesh.worker.remote import WorkerClients

SCENARIOS = ("step", "zero", "failover", "cordon", "spillover")
_POLL_S = 0.2
AGGREGATED = str(10**9)  # --disagg-min-tokens: every prompt prefilled on its decode worker


@dataclasses.dataclass(frozen=True, slots=True)
class AutoscaleBench:
    model: str = "smollm2"
    prompt_tokens: int = 64
    max_tokens: int = 32
    low_rate: float = 0.5
    high_rate: float = 4.0
    low_s: float = 15.0
    high_s: float = 40.0
    tail_s: float = 60.0
    replica_concurrency: int = 4
    target_utilization: float = 0.75
    window_s: float = 10.0
    scale_down_delay_s: float = 20.0
    tick_s: float = 1.0
    ttft_target_s: float = 2.0
    saturation_in_flight: int = 3
    num_blocks: int = 1024
    device: str = "cpu"
    seed: int = 0


def _config(bench: AutoscaleBench, log_dir: Path, **changes: Any) -> UpConfig:
    base = UpConfig(
        model=bench.model, num_prefill=0, num_decode=1, registry_port=0, router_port=0,
        edge_port=0, device=bench.device, log_dir=log_dir, admin_token="bench",
        autoscaler_tick_s=bench.tick_s, capacity=3,
        extra_worker_args=["--num-blocks", str(bench.num_blocks), "--ttl-s", "1"],
        extra_router_args=["--disagg-min-tokens", AGGREGATED],
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def _load(
    bench: AutoscaleBench, url: str, rate: float, seconds: float, seed: int
) -> load.BenchConfig:
    count = max(1, round(rate * seconds))
    return load.BenchConfig(
        target=url,
        workload=load.RandomPrompts(
            num_prompts=count, input_len=bench.prompt_tokens, output_len=bench.max_tokens
        ),
        arrivals=load.OpenLoop(rate=rate),
        num_requests=count,
        seed=seed,
        request_timeout_s=300.0,
    )


def _phase(result: load.BenchResult, started: float, max_tokens: int) -> dict[str, Any]:
    records = result.records
    ok = [r for r in records if r.ok]
    ttfts = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    return {
        "started_s": round(started, 2),
        "requests": len(records),
        "failed": sum(1 for r in records if not r.ok),
        "truncated": sum(1 for r in ok if r.completion_tokens != max_tokens),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "ttft_p50_s": _pct(ttfts, 0.5),
        "ttft_p90_s": _pct(ttfts, 0.9),
    }


async def _edge_outcomes(url: str) -> dict[str, float]:
    """The edge's `kvmesh_edge_cluster_requests_total` as {"cluster/outcome": count}."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    samples = await scrape(int(port), host)
    prefix = "kvmesh_edge_cluster_requests_total{"
    outcomes = {}
    for key, value in samples.items():
        if key.startswith(prefix):
            labels = dict(part.split("=", 1) for part in key[len(prefix) : -1].split(","))
            name = f"{labels['cluster'].strip(chr(34))}/{labels['outcome'].strip(chr(34))}"
            outcomes[name] = value
    return dict(sorted(outcomes.items()))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


class Admin:
    """The autoscaler's and control plane's RPCs with the mesh's admin token."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        token = mesh.config.admin_token
        self._metadata = [("authorization", f"Bearer {token}")] if token else []

    async def decisions(self) -> list[autoscaler_pb2.ScalingDecision]:
        async with grpc.aio.insecure_channel(self._mesh.autoscaler_address) as channel:
            stub = autoscaler_pb2_grpc.AutoscalerStub(channel)
            response = await stub.ListDecisions(
                autoscaler_pb2.ListDecisionsRequest(limit=1000), metadata=self._metadata
            )
        return list(response.decisions)

    async def workers(self, tier: str = "decode") -> list[controlplane_pb2.WorkerSummary]:
        proto_tier = tiers.to_proto(tier)
        response = await self._controlplane("ListWorkers", controlplane_pb2.ListWorkersRequest())
        return [w for w in response.workers if w.tier == proto_tier]

    async def events(self) -> list[controlplane_pb2.Event]:
        request = controlplane_pb2.ListEventsRequest(limit=1000)
        return list((await self._controlplane("ListEvents", request)).events)

    async def cordon(self, cluster: str) -> None:
        request = controlplane_pb2.CordonClusterRequest(cluster=cluster)
        await self._controlplane("CordonCluster", request)

    async def _controlplane(self, method: str, request: Any) -> Any:
        async with grpc.aio.insecure_channel(self._mesh.controlplane_address) as channel:
            stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
            return await getattr(stub, method)(request, metadata=self._metadata)


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Poll `check` until it holds; the time it first held (wall clock)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if await check():
            return time.time()
        await asyncio.sleep(_POLL_S)  # polling the mesh's admin RPCs, bounded by the deadline
    raise TimeoutError(f"{what}: not within {timeout_s:g} s")


async def _set_decode_policy(mesh: Mesh, bench: AutoscaleBench, **fields: float) -> None:
    await mesh.set_policy(
        "decode",
        replica_concurrency=bench.replica_concurrency,
        target_utilization=bench.target_utilization,
        window_s=bench.window_s,
        scale_down_delay_s=bench.scale_down_delay_s,
        max_step=1,
        **fields,
    )


async def step(bench: AutoscaleBench, log_dir: Path) -> dict[str, Any]:
    mesh = Mesh(_config(bench, log_dir, autoscale=True))
    try:
        await mesh.start()
        admin = Admin(mesh)
        await _set_decode_policy(mesh, bench, min_replicas=1, max_replicas=3)
        first = {w.worker_id for w in await admin.workers()}
        t0 = time.time()
        low = await load.run_async(_load(bench, mesh.edge_url, bench.low_rate, bench.low_s, 1))
        t_step = time.time()
        high_task = asyncio.create_task(
            load.run_async(_load(bench, mesh.edge_url, bench.high_rate, bench.high_s, 2))
        )

        async def grew() -> bool:
            return any(
                d.desired_replicas >= 2 and d.time.ToDatetime().timestamp() >= t_step - 1
                for d in await admin.decisions()
            )

        t_decided = await _until(grew, bench.high_s + 30, "the autoscaler asking for 2")
        new: list[controlplane_pb2.WorkerSummary] = []

        async def joined() -> bool:
            new[:] = [w for w in await admin.workers() if w.worker_id not in first]
            return bool(new)

        t_ready = await _until(joined, 300, "a new decode replica registering")
        clients = WorkerClients()

        async def served() -> bool:
            report = await clients.load(new[0].grpc_address)
            return report is not None and report.num_running > 0

        try:
            t_served = await _until(served, bench.high_s + 60, "the new replica serving")
        finally:
            await clients.close()
        high = await high_task
        t_tail = time.time()
        tail_task = asyncio.create_task(
            load.run_async(_load(bench, mesh.edge_url, 0.3, bench.tail_s, 3))
        )
        peak = len(await admin.workers())

        async def shrank() -> bool:
            return len(await admin.workers()) <= 1

        t_shrunk = await _until(shrank, bench.tail_s + 120, "the tier shrinking back to 1")
        tail = await tail_task
        return {
            "scenario": "step",
            "phases": {
                "low": _phase(low, 0.0, bench.max_tokens),
                "high": _phase(high, t_step - t0, bench.max_tokens),
                "tail": _phase(tail, t_tail - t0, bench.max_tokens),
            },
            "peak_decode_replicas": peak,
            "step_to_decision_s": round(t_decided - t_step, 2),
            "step_to_new_replica_registered_s": round(t_ready - t_step, 2),
            "step_to_new_replica_serving_s": round(t_served - t_step, 2),
            "load_end_to_shrunk_s": round(t_shrunk - t_tail, 2),
            "scale_down_delay_s": bench.scale_down_delay_s,
            "window_s": bench.window_s,
        }
    finally:
        await mesh.stop()


async def zero(bench: AutoscaleBench, log_dir: Path) -> dict[str, Any]:
    mesh = Mesh(_config(bench, log_dir, autoscale=True))
    try:
        await mesh.start()
        admin = Admin(mesh)
        await _set_decode_policy(mesh, bench, min_replicas=0, max_replicas=1)
        t_policy = time.time()

        async def at_zero() -> bool:
            return not await admin.workers()

        t_zero = await _until(at_zero, bench.scale_down_delay_s + 120, "the tier reaching 0")
        t_sent = time.time()
        sending = asyncio.create_task(load.run_async(_load(bench, mesh.edge_url, 1.0, 1.0, 4)))

        async def registered() -> bool:
            return bool(await admin.workers())

        t_registered = await _until(registered, 300, "a decode replica registering")
        one = await sending
        t_done = time.time()
        woke = [
            d
            for d in await admin.decisions()
            if d.desired_replicas >= 1
            and d.current_replicas == 0
            and d.time.ToDatetime().timestamp() >= t_sent - 1
        ]
        record = one.records[0]
        return {
            "scenario": "zero",
            "policy_to_zero_s": round(t_zero - t_policy, 2),
            "scale_down_delay_s": bench.scale_down_delay_s,
            "request": _phase(one, t_sent - t_policy, bench.max_tokens),
            "cold_start_ttft_s": round(record.ttft_s, 2) if record.ttft_s is not None else None,
            "send_to_wake_decision_s": (
                round(woke[-1].time.ToDatetime().timestamp() - t_sent, 2) if woke else None
            ),
            "send_to_replica_registered_s": round(t_registered - t_sent, 2),
            "request_e2e_s": round(t_done - t_sent, 2),
            "wake_reason": woke[-1].reason if woke else None,
        }
    finally:
        await mesh.stop()


async def failover(bench: AutoscaleBench, log_dir: Path) -> dict[str, Any]:
    config = _config(bench, log_dir, clusters=("us-east", "eu-west"))
    mesh = Mesh(config)
    try:
        await mesh.start()
        seconds = bench.low_s + bench.high_s
        rate = bench.low_rate * 2
        t0 = time.time()
        running = asyncio.create_task(load.run_async(_load(bench, mesh.edge_url, rate, seconds, 5)))
        await asyncio.sleep(seconds / 3)  # the load runs a third of its course before the kill
        t_kill = time.time()
        killed = [c for c in mesh.children if "us-east" in c.name and c.name != "router-us-east"]
        killed = [c for c in killed if c.name.startswith(("decode", "prefill"))]
        for child in killed:
            child.process.send_signal(signal.SIGKILL)
        result = await running
        kill_s = t_kill - t0
        after = [r for r in result.records if r.sent_s >= kill_s]
        in_flight = [
            r
            for r in result.records
            if r.sent_s < kill_s and (r.e2e_s is None or r.sent_s + r.e2e_s > kill_s)
        ]
        served_after = [r.sent_s + r.ttft_s - kill_s for r in after if r.ttft_s is not None]
        return {
            "scenario": "failover",
            "killed": [c.name for c in killed],
            "all": _phase(result, 0.0, bench.max_tokens),
            "sent_after_kill": len(after),
            "failed_after_kill": sum(1 for r in after if not r.ok),
            "in_flight_at_kill": len(in_flight),
            "failed_in_flight_at_kill": sum(1 for r in in_flight if not r.ok),
            "max_ttft_after_kill_s": round(max(r.ttft_s or 0 for r in after), 2) if after else None,
            "first_token_after_kill_s": round(min(served_after), 2) if served_after else None,
            "edge_outcomes": await _edge_outcomes(mesh.edge_url),
        }
    finally:
        await mesh.stop()


async def cordon(bench: AutoscaleBench, log_dir: Path) -> dict[str, Any]:
    config = _config(bench, log_dir, clusters=("us-east", "eu-west"), autoscale=True)
    mesh = Mesh(config)
    try:
        await mesh.start()
        admin = Admin(mesh)
        await _set_decode_policy(mesh, bench, min_replicas=2, max_replicas=2)

        async def spread() -> bool:
            return {w.cluster for w in await admin.workers()} == {"us-east", "eu-west"}

        await _until(spread, 300, "one decode replica in each cluster")
        seconds = bench.low_s + bench.high_s
        running = asyncio.create_task(
            load.run_async(_load(bench, mesh.edge_url, bench.low_rate * 2, seconds, 6))
        )
        await asyncio.sleep(seconds / 3)  # the load runs a third of its course before the cordon
        t_cordon = time.time()
        await admin.cordon("us-east")

        async def moved() -> bool:
            return {w.cluster for w in await admin.workers()} == {"eu-west"}

        t_moved = await _until(moved, seconds + 120, "us-east deregistered")

        async def removed() -> bool:
            return any(
                e.kind == "scale_down" and e.message.startswith("us-east:")
                for e in await admin.events()
            )

        t_removed = await _until(removed, seconds + 120, "us-east drained and removed")
        result = await running
        return {
            "scenario": "cordon",
            "all": _phase(result, 0.0, bench.max_tokens),
            "cordon_to_us_east_deregistered_s": round(t_moved - t_cordon, 2),
            "cordon_to_us_east_drained_and_removed_s": round(t_removed - t_cordon, 2),
            "eu_west_replicas_after": len(await admin.workers()),
            "edge_outcomes": await _edge_outcomes(mesh.edge_url),
        }
    finally:
        await mesh.stop()


async def spillover(bench: AutoscaleBench, log_dir: Path) -> dict[str, Any]:
    saturation = ["--saturation-in-flight", str(bench.saturation_in_flight)]
    config = _config(
        bench,
        log_dir,
        clusters=("us-east", "eu-west"),
        extra_router_args=["--disagg-min-tokens", AGGREGATED, *saturation],
    )
    mesh = Mesh(config)
    try:
        await mesh.start()
        home_only = await mesh.add_edge("edge-home-only", mesh.routers["us-east"])
        rate, seconds = bench.high_rate, bench.high_s
        slo = load.Slo(ttft_ms=bench.ttft_target_s * 1000)
        runs: dict[str, load.BenchResult] = {}
        for name, url, seed in (("home_only", home_only, 7), ("spillover", mesh.edge_url, 7)):
            runs[name] = await load.run_async(
                dataclasses.replace(_load(bench, url, rate, seconds, seed), slo=slo)
            )
        phases = {name: _phase(result, 0.0, bench.max_tokens) for name, result in runs.items()}
        return {
            "scenario": "spillover",
            "ttft_target_s": bench.ttft_target_s,
            "rate": rate,
            "runs": phases,
            "edge_outcomes_spillover": await _edge_outcomes(mesh.edge_url),
            "home_only_within_target": _within(phases["home_only"], bench.ttft_target_s),
            "spillover_within_target": _within(phases["spillover"], bench.ttft_target_s),
        }
    finally:
        await mesh.stop()


def _within(phase: dict[str, Any], target_s: float) -> bool:
    p90 = phase["ttft_p90_s"]
    return p90 is not None and p90 <= target_s and phase["failed"] == 0


_RUNNERS = {
    "step": step,
    "zero": zero,
    "failover": failover,
    "cordon": cordon,
    "spillover": spillover,
}


async def run(bench: AutoscaleBench, scenarios: tuple[str, ...]) -> dict[str, Any]:
    report: dict[str, Any] = {"config": dataclasses.asdict(bench), "scenarios": {}}
    for name in scenarios:
        log_dir = Path(tempfile.mkdtemp(prefix=f"kvmesh-bench-autoscale-{name}-"))
        started = time.time()
        result = await _RUNNERS[name](bench, log_dir)
        result["logs"] = str(log_dir)
        result["wall_s"] = round(time.time() - started, 1)
        report["scenarios"][name] = result
    return report
