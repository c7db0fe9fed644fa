"""`kvmesh bench-mesh`: TTFT and inter-token latency through the mesh, side by side.

One mesh (registry, one prefill and one decode worker) and three ways in, used in turn, one
request at a time (low load), each prompt fresh random tokens so no prefix cache helps:

- disaggregated: a router that always prefills on the prefill worker (KV moves over NIXL);
- aggregated: a second router, on the same workers, that never does (the decode worker
  prefills) — the TTFT goal is disaggregated <= 1.2x aggregated;
- direct: `Decode` called on the decode worker itself, no router — aggregated minus direct is
  the router's overhead per request (TTFT) and per streamed token (ITL).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmesh.api.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from kvmesh.rpc import open_channel
from kvmesh.security.roles import Role
from kvmesh.security.tls import TlsIdentity
from kvmesh.up import Mesh, UpConfig, worker_devices


@dataclass(slots=True)
class Latencies:
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            "ttft_p50_ms": _q(self.ttft_s, 0.5) * 1000,
            "ttft_p90_ms": _q(self.ttft_s, 0.9) * 1000,
            "itl_p50_ms": _q(self.itl_s, 0.5) * 1000,
            "itl_p90_ms": _q(self.itl_s, 0.9) * 1000,
        }


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _timed(stream: AsyncIterator[int], into: Latencies) -> None:
    """Record TTFT and the gaps between tokens of one streamed response."""
    started = time.perf_counter()
    last: float | None = None
    async for count in stream:
        now = time.perf_counter()
        if last is None:
            into.ttft_s.append(now - started)
        elif count:
            into.itl_s.extend([(now - last) / count] * count)
        last = now


async def _via_router(
    stub: generation_pb2_grpc.GenerationAsyncStub, prompt: list[int], max_tokens: int
) -> AsyncIterator[int]:
    request = generation_pb2.GenerateRequest(
        request_id=uuid.uuid4().hex,
        token_ids=generation_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        return_token_ids=True,
    )
    async for response in stub.Generate(request):
        yield len(response.token_ids)


async def _direct(
    stub: worker_pb2_grpc.DecodeAsyncStub, prompt: list[int], max_tokens: int
) -> AsyncIterator[int]:
    request = worker_pb2.DecodeRequest(
        request_id=uuid.uuid4().hex,
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
    )
    async for response in stub.Decode(request):
        yield len(response.token_ids)


async def _measure(
    mesh: Mesh, rng: random.Random, prompt_tokens: int, max_tokens: int, requests: int
) -> dict[str, Latencies]:
    aggregated_address = await mesh.add_router(
        "router-aggregated", ["--disagg-min-tokens", "1000000000"]
    )
    decode_address = mesh.child("decode-0").address
    tls_dir = mesh.config.tls_dir  # under --secure: an admin client of the routers, and the
    admin = TlsIdentity.load(tls_dir, Role.ADMIN) if tls_dir else None  # router's identity
    router = TlsIdentity.load(tls_dir, Role.ROUTER) if tls_dir else None  # for Decode itself
    channels = [
        open_channel(mesh.router_address, identity=admin),
        open_channel(aggregated_address, identity=admin),
        open_channel(decode_address, identity=router),
    ]
    try:
        disagg = generation_pb2_grpc.GenerationStub(channels[0])
        agg = generation_pb2_grpc.GenerationStub(channels[1])
        direct = worker_pb2_grpc.DecodeStub(channels[2])
        ways: dict[str, Callable[[list[int]], AsyncIterator[int]]] = {
            "disaggregated": lambda p: _via_router(disagg, p, max_tokens),
            "aggregated": lambda p: _via_router(agg, p, max_tokens),
            "direct_decode": lambda p: _direct(direct, p, max_tokens),
        }
        results = {name: Latencies() for name in ways}
        for i in range(requests + 1):  # the first round warms up
            for name, way in ways.items():
                prompt = [rng.randrange(100, 49000) for _ in range(prompt_tokens)]
                target = results[name] if i else Latencies()
                await _timed(way(prompt), target)
    finally:
        for channel in channels:
            await channel.close(None)
    return results


async def run(
    *,
    prompt_tokens: int = 1024,
    max_tokens: int = 32,
    requests: int = 10,
    model: str = "smollm2",
    device: str = "cpu",
    num_blocks: int = 1024,
    worker_args: tuple[str, ...] = (),
    seed: int = 0,
    secure: bool = False,
) -> dict[str, Any]:
    rng = random.Random(seed)
    log_dir = Path(tempfile.mkdtemp(prefix="kvmesh-bench-"))
    config = UpConfig(
        model=model, registry_port=0, router_port=0, edge_port=0, disagg_min_tokens=0,
        device=device, log_dir=log_dir, secure=secure,
        extra_worker_args=["--num-blocks", str(num_blocks), *worker_args],
    )  # fmt: skip
    mesh = Mesh(config)
    try:
        await mesh.start()
        results = await _measure(mesh, rng, prompt_tokens, max_tokens, requests)
    finally:
        await mesh.stop()
    summary = {name: lat.summary() for name, lat in results.items()}
    d, a, x = summary["disaggregated"], summary["aggregated"], summary["direct_decode"]
    return {
        "model": model,
        "secure": secure,
        "devices": worker_devices(device, 2),
        "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens,
        "requests": requests,
        **summary,
        "ttft_p50_disaggregated_over_aggregated": d["ttft_p50_ms"] / a["ttft_p50_ms"],
        "ttft_p90_disaggregated_over_aggregated": d["ttft_p90_ms"] / a["ttft_p90_ms"],
        "router_overhead_per_request_ms": a["ttft_p50_ms"] - x["ttft_p50_ms"],
        "router_overhead_per_token_ms": a["itl_p50_ms"] - x["itl_p50_ms"],
        "logs": str(log_dir),
    }


async def compare_secure(*, rounds: int = 2, **kwargs: Any) -> dict[str, Any]:
    """The same benchmark without and with `kvmesh up --secure`, alternating for `rounds`
    rounds (a fresh mesh each time); each ratio (secure / plain) is the median of the rounds'."""
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "secure": []}
    for _ in range(rounds):
        runs["plain"].append(await run(**kwargs))
        runs["secure"].append(await run(**kwargs, secure=True))
    ratios: dict[str, float] = {}
    for way in ("disaggregated", "aggregated", "direct_decode"):
        for metric in ("ttft_p50_ms", "itl_p50_ms"):
            pairs = zip(runs["secure"], runs["plain"], strict=True)
            ratios[f"{way}_{metric.removesuffix('_ms')}"] = statistics.median(
                s[way][metric] / p[way][metric] for s, p in pairs
            )
    return {"rounds": rounds, "secure_over_plain": ratios, "runs": runs}
