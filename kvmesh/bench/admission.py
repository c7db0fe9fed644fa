"""`kvmesh bench-admission`: a burst past the router's admission bounds, through the edge.

A mesh of sim workers (no GPU, no torch) behind one router started with small `--max-in-flight`
and `--max-queue`; `burst` chat completions arrive at once. What it reports:

- how many were admitted (200) and refused (429, the router's queue full), and that every one
  got an answer within `timeout_s` (none hung);
- the latency of the admitted ones (p50, p99, max) against one request alone, and the bound
  admission implies: a request waits behind at most max_in_flight + max_queue others, run
  max_in_flight at a time, so p99 / alone should stay near 1 + (max_queue + max_in_flight) /
  max_in_flight, whatever the burst;
- how fast the refusals came (p99).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from kvmesh.up import Mesh, UpConfig


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


async def _chat(http: httpx.AsyncClient, model: str, max_tokens: int) -> tuple[int, float]:
    started = time.perf_counter()
    response = await http.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "Tell me about admission control."}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )
    return response.status_code, time.perf_counter() - started


async def run(
    *,
    burst: int = 64,
    max_in_flight: int = 4,
    max_queue: int = 8,
    max_tokens: int = 32,
    speed: float = 0.1,
    model: str = "dummy:smollm2-135m",
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    config = UpConfig(
        model=model,
        num_prefill=0,
        num_decode=1,
        registry_port=0,
        router_port=0,
        edge_port=0,
        device="cpu",
        log_dir=Path(tempfile.mkdtemp(prefix="kvmesh-admission-")),
        extra_worker_args=["--engine", "sim", "--engine-arg", f"speed={speed}"],
        extra_router_args=["--max-in-flight", str(max_in_flight), "--max-queue", str(max_queue)],
    )
    mesh = Mesh(config)
    try:
        await mesh.start()
        async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=timeout_s) as http:
            await _chat(http, mesh.model_id, max_tokens)  # warm-up
            alone = [(await _chat(http, mesh.model_id, max_tokens))[1] for _ in range(3)]
            results = await asyncio.gather(
                *(_chat(http, mesh.model_id, max_tokens) for _ in range(burst))
            )
    finally:
        await mesh.stop()
    admitted = [s for code, s in results if code == 200]
    refused = [s for code, s in results if code == 429]
    other = sorted({code for code, _ in results if code not in (200, 429)})
    single = statistics.median(alone)
    bound = 1 + (max_queue + max_in_flight) / max_in_flight
    p99 = _quantile(admitted, 0.99)
    return {
        "burst": burst,
        "max_in_flight": max_in_flight,
        "max_queue": max_queue,
        "max_tokens": max_tokens,
        "sim_speed": speed,
        "admitted": len(admitted),
        "refused_429": len(refused),
        "other_statuses": other,
        "all_answered": len(results) == burst,
        "alone_s": single,
        "admitted_p50_s": _quantile(admitted, 0.5),
        "admitted_p99_s": p99,
        "admitted_max_s": max(admitted, default=0.0),
        "admitted_p99_over_alone": p99 / single if single else 0.0,
        "bound_p99_over_alone": bound,
        "refused_p99_s": _quantile(refused, 0.99),
    }
