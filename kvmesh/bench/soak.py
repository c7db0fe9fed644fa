"""`kvmesh soak`: traffic through the edge while a chaos loop kills the mesh's processes.

The mesh: `kvmesh up --routers 2 --prefill 2 --decode 2` with supervision (a killed child is
started again), the workers on the sim engine at an H100's pace by default (every process of
the mesh is real; only the forward pass is simulated, so the machine's two cores carry the
traffic and the failures are the mesh's own).

1. A reference: the greedy answer of each of `prompts` prompts, before any chaos.
2. Traffic for `minutes`: a request every 1/`rate` seconds, on a schedule kept against the
   clock (so exactly minutes x 60 x rate arrive, whatever the machine's hiccups), each
   streaming or not, greedy (one of the reference prompts: its answer must be the reference)
   or sampled (temperature 0.8, any answer).
3. Chaos: every `kill_every` seconds one random process of `targets` gets SIGKILL;
   supervision restarts it.
4. Afterwards: the traffic drains, leases run out, and every worker is asked what it still
   holds (leases, pinned KV blocks, requests in its engine).

The report: requests sent, completed, failed by HTTP status (0: no answer at all), TTFT and ITL
p50 / p99 as the client saw them (streams), greedy answers that differ from the reference, the
kills and restarts, and what each worker holds at the end.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import structlog

from kvmesh.api.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.rpc import open_channel
from kvmesh.up import Mesh, UpConfig

log = structlog.get_logger(__name__)

TARGETS = ("prefill", "decode", "router", "registry")
SIM_MODEL = "dummy:smollm2-135m"  # SmolLM2's shape, tokenizer and chat template: no weights


@dataclass(slots=True)
class _Tally:
    sent: int = 0
    completed: int = 0
    failed: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # the first few, for the report
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, status: int, why: str) -> None:
        self.failed[status] += 1
        if len(self.failures) < 20:
            self.failures.append(f"{status}: {why[:300]}")


def _prompt(i: int) -> str:
    return f"Soak prompt {i}: describe a mesh of services in one long paragraph."


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


async def _ask(
    http: httpx.AsyncClient,
    model: str,
    prompt: str,
    *,
    stream: bool,
    greedy: bool,
    max_tokens: int,
    tally: _Tally | None,
    seed: int,
) -> str | None:
    """One chat completion; its text, or None when it failed (counted in `tally`)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    body |= {"temperature": 0} if greedy else {"temperature": 0.8, "seed": seed}
    started = time.perf_counter()
    try:
        if not stream:
            response = await http.post("/v1/chat/completions", json=body)
            if response.status_code != 200:
                if tally is not None:
                    tally.fail(response.status_code, response.text)
                return None
            if tally is not None:
                tally.ttft.append(time.perf_counter() - started)
            return str(response.json()["choices"][0]["message"]["content"])
        text, last = "", None
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                if tally is not None:
                    tally.fail(response.status_code, (await response.aread()).decode())
                return None
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    if tally is not None:
                        tally.fail(500, json.dumps(chunk["error"]))
                    return None
                for choice in chunk["choices"]:
                    piece = choice["delta"].get("content") or ""
                    if not piece:
                        continue
                    now = time.perf_counter()
                    if tally is not None:
                        if last is None:
                            tally.ttft.append(now - started)
                        else:
                            tally.itl.append(now - last)
                    last = now
                    text += piece
        return text
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        if tally is not None:
            tally.fail(0, repr(e))
        return None


async def _traffic(
    mesh: Mesh,
    reference: dict[int, str],
    tally: _Tally,
    *,
    rate: float,
    seconds: float,
    max_tokens: int,
    rng: random.Random,
) -> None:
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=120) as http:

        async def one(i: int) -> None:
            greedy = rng.random() < 0.5
            stream = rng.random() < 0.5
            prompt_id = rng.randrange(len(reference))
            prompt = _prompt(prompt_id) if greedy else f"Sampled {i}: write a short story."
            text = await _ask(
                http,
                mesh.model_id,
                prompt,
                stream=stream,
                greedy=greedy,
                max_tokens=max_tokens,
                tally=tally,
                seed=i,
            )
            if text is None:
                return
            tally.completed += 1
            if greedy and text != reference[prompt_id]:
                tally.mismatches.append({"prompt": prompt_id, "stream": stream, "got": text[:200]})

        pending: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        for i in range(round(seconds * rate)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))  # the schedule
            task = asyncio.create_task(one(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
            tally.sent += 1
        await asyncio.gather(*pending)


async def _chaos(
    mesh: Mesh, tally: _Tally, *, every_s: float, targets: tuple[str, ...], rng: random.Random
) -> None:
    while True:
        await asyncio.sleep(every_s)
        victims = [c for c in mesh.children if c.alive and c.name.split("-")[0] in targets]
        if not victims:
            continue
        victim = rng.choice(victims)
        victim.process.send_signal(signal.SIGKILL)
        tally.kills.append({"time_s": round(time.monotonic(), 1), "child": victim.name})
        log.warning("soak: killed", child=victim.name)


async def _holdings(mesh: Mesh, settle_s: float) -> dict[str, dict[str, int]]:
    """What each worker still holds once leases have had `settle_s` to run out."""
    deadline = time.monotonic() + settle_s
    held: dict[str, dict[str, int]] = {}
    for child in mesh.workers("prefill") + mesh.workers("decode"):
        async with open_channel(child.address, wait_for_ready=False) as channel:
            while True:
                stats = await worker_pb2_grpc.KvTransferStub(channel).GetTransferStats(
                    worker_pb2.GetTransferStatsRequest(), timeout=10
                )
                clean = stats.active_leases == 0 and stats.pinned_blocks == 0
                if clean or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)  # leases run out on their own clock
            held[child.name] = {
                "active_leases": stats.active_leases,
                "pinned_blocks": stats.pinned_blocks,
            }
    return held


async def run(
    *,
    minutes: float,
    rate: float,
    kill_every_s: float,
    targets: tuple[str, ...] = TARGETS,
    max_tokens: int = 24,
    prompts: int = 40,
    speed: float = 1.0,
    seed: int = 0,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    rng = random.Random(seed)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="kvmesh-soak-"))
    config = UpConfig(
        model=SIM_MODEL,
        num_prefill=2,
        num_decode=2,
        routers=2,
        registry_port=0,
        router_port=0,
        edge_port=0,
        device="cpu",
        disagg_min_tokens=0,
        log_dir=log_dir,
        restart=True,
        extra_worker_args=["--engine", "sim", "--engine-arg", f"speed={speed}", "--lease-s", "5"],
    )
    mesh = Mesh(config)
    tally = _Tally()
    try:
        await mesh.start()
        mesh.supervise()
        async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=120) as http:
            reference: dict[int, str] = {}
            for i in range(prompts):
                for stream in (False, True):  # both ways give one answer
                    text = await _ask(
                        http, mesh.model_id, _prompt(i), stream=stream, greedy=True,
                        max_tokens=max_tokens, tally=None, seed=0,
                    )  # fmt: skip
                    if text is None:
                        raise RuntimeError(f"the reference request {i} failed before any chaos")
                    if reference.setdefault(i, text) != text:
                        raise RuntimeError(f"prompt {i}: streamed and whole answers differ")
        started = time.monotonic()
        chaos = asyncio.create_task(
            _chaos(mesh, tally, every_s=kill_every_s, targets=targets, rng=rng)
        )
        try:
            await _traffic(
                mesh, reference, tally, rate=rate, seconds=minutes * 60,
                max_tokens=max_tokens, rng=rng,
            )  # fmt: skip
        finally:
            chaos.cancel()
        elapsed = time.monotonic() - started
        for kill in tally.kills:
            kill["time_s"] = round(kill["time_s"] - started, 1)
        await asyncio.sleep(2)  # restarts of the last kill
        held = await _holdings(mesh, settle_s=30)
        restarts = dict(mesh.restarts)
    finally:
        await mesh.stop()
    return {
        "minutes": minutes,
        "rate_per_s": rate,
        "kill_every_s": kill_every_s,
        "targets": list(targets),
        "engine": f"sim (speed {speed}: {speed}x an H100's pace)",
        "elapsed_s": round(elapsed, 1),
        "sent": tally.sent,
        "completed": tally.completed,
        "failed": sum(tally.failed.values()),
        "failed_by_status": {str(k): v for k, v in sorted(tally.failed.items())},
        "first_failures": tally.failures,
        "greedy_mismatches": len(tally.mismatches),
        "mismatches": tally.mismatches[:20],
        "ttft_s": {"p50": _q(tally.ttft, 0.5), "p99": _q(tally.ttft, 0.99)},
        "itl_s": {"p50": _q(tally.itl, 0.5), "p99": _q(tally.itl, 0.99)},
        "kills": len(tally.kills),
        "kills_by_target": dict(Counter(k["child"].split("-")[0] for k in tally.kills)),
        "restarts": restarts,
        "leaked": {
            "leases": sum(h["active_leases"] for h in held.values()),
            "pinned_blocks": sum(h["pinned_blocks"] for h in held.values()),
        },
        "workers_at_end": held,
        "mean_ttft_s": statistics.fmean(tally.ttft) if tally.ttft else 0.0,
        "log_dir": str(log_dir),
    }
