"""kvmesh's cache-aware router next to `sglang-router` (policy cache_aware), on the same workers.

    .venv/bin/kvmesh bench-sglang --sglang-router /tmp/sglvenv/bin/python

One mesh, aggregated (`num_decode` decode workers, no prefill tier: each worker prefills and
decodes its own requests, so the only routing decision is which worker, for both systems):

    kvmesh:         load -> edge -> router (cache_aware, all workers) -> decode-0 | -1 | -2
    sglang-router:  load -> sglang-router (cache_aware) -> edge-pin-i -> router-pin-i -> decode-i

sglang-router routes to OpenAI-compatible HTTP workers, so each decode worker is put behind its
own router pinned to it (`--only-workers ID`) and its own edge: three HTTP "workers", each backed
by exactly one engine, and the pinned router has no choice to make. The sglang path therefore has
one more HTTP hop (a Rust proxy on loopback) than ours; that is part of what is measured.

What sglang-router 0.3.2 needs from a worker, as observed against our edge: at registration it
first tries the URL as gRPC (an HTTP/2 preface, which the edge answers with 404), then
`GET /health` (must be 200), then `GET /server_info`, `/get_server_info`, `/model_info` and
`/get_model_info` for metadata; after that, `GET /health` every 60 s. The edge answers the four
metadata paths with 404; sglang-router accepts that, registers the worker with model id
"unknown" and still forwards every model name. It re-serializes completion requests with
SGLang's extra fields (`no_stop_trim`, `skip_special_tokens`, ...), which the edge ignores, and
passes the SSE stream, `usage.prompt_tokens_details.cached_tokens` included, through unchanged.
Its cache-aware policy matches on request *text*, so prompts are sent as text (the workload's
token ids decoded with the SmolLM2 tokenizer) to both systems.

The same shared-prefix workload runs through kvmesh first, then sglang-router, each with its own
seed so the second run finds none of the first's prefixes cached (the workers are not restarted;
`num_blocks` is large enough that their caches hold both runs without evicting). Before the
first run every worker answers one short request through its pinned edge, so neither run pays
the engines' first-request cost. Per run: the prefix hit rate (cached / prompt tokens, as the
workers report them), TTFT, errors, and how many requests each worker served (its
`kvmesh_rpc_server_handled_total` for Decode); for kvmesh also the router's decisions by reason,
and for sglang-router every request it sent the pinned edges, by route.

sglang-router is a peer system we compare against, not a dependency: it is not in pyproject.toml
and must be installed into its own virtualenv, whose interpreter `--sglang-router` names:

    python3 -m venv /tmp/sglvenv && /tmp/sglvenv/bin/pip install sglang-router==0.3.2
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from kvmesh.bench import load
from kvmesh.bench.routing import SMALL_SHARED_PREFIX, requests_served
from kvmesh.telemetry.scrape import scrape
from kvmesh.up import Child, Mesh, UpConfig

INSTALL_HINT = (
    "install it into a virtualenv of its own (it is not a kvmesh dependency) and pass that "
    "interpreter: python3 -m venv /tmp/sglvenv && /tmp/sglvenv/bin/pip install "
    "sglang-router==0.3.2, then --sglang-router /tmp/sglvenv/bin/python"
)
_POLL_S = 0.5
_LOG_TAIL_LINES = 20
_EDGE_REQUESTS = "kvmesh_edge_http_requests_total{"
_LABEL = re.compile(r'(\w+)="([^"]*)"')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # its log is colored even when written to a file


class SglangRouterError(Exception):
    """sglang-router is not installed, did not start, or never saw every worker healthy."""


@dataclasses.dataclass(frozen=True, slots=True)
class CompareBench:
    sglang_python: str = "python3"  # an interpreter that can import sglang_router
    workload: load.SharedPrefix = SMALL_SHARED_PREFIX
    rate: float = 1.0
    num_decode: int = 3
    block_size: int = 16
    num_blocks: int = 1024
    device: str = "cpu"
    seed: int = 0
    sglang_ready_timeout_s: float = 60.0


async def run(bench: CompareBench) -> dict[str, Any]:
    version = await sglang_router_version(bench.sglang_python)  # before paying for a mesh
    log_dir = Path(tempfile.mkdtemp(prefix="kvmesh-bench-sglang-"))
    config = UpConfig(
        num_prefill=0, num_decode=bench.num_decode, registry_port=0, router_port=0,
        edge_port=0, device=bench.device, log_dir=log_dir,
        extra_worker_args=["--num-blocks", str(bench.num_blocks), "--block-size",
                           str(bench.block_size), "--ttl-s", "1"],
        extra_router_args=["--policy", "cache_aware"],
    )  # fmt: skip
    mesh = Mesh(config)
    sglang: SglangRouter | None = None
    report: dict[str, Any] = {"config": dataclasses.asdict(bench), "logs": str(log_dir)}
    try:
        await mesh.start()
        decodes = mesh.workers("decode")
        pinned = await _pin_edges(mesh, decodes)
        model = await _first_model(mesh.edge_url)
        edge_urls = [p["edge"] for p in pinned.values()]
        for url in edge_urls:
            await _warm_up(url, model)
        before = await _edge_requests(edge_urls)  # only sglang-router talks to them from here
        sglang = SglangRouter(
            bench.sglang_python,
            edge_urls,
            log_path=log_dir / "sglang-router.log",
            ready_timeout_s=bench.sglang_ready_timeout_s,
        )
        await sglang.start()
        report["topology"] = {
            "kvmesh": {"edge": mesh.edge_url, "router": mesh.router_address},
            "workers": pinned,
            "sglang_router": {
                "version": version,
                "url": sglang.url,
                "argv": sglang.argv,
                "workers_as_registered": await sglang.workers(),
            },
        }
        router = mesh.child("router")
        decided = await _decisions(router)
        seed = bench.seed * 1000
        ours = await _measure(mesh.edge_url, model, decodes, bench, seed)
        ours["router_decisions"] = _minus(await _decisions(router), decided)
        theirs = await _measure(sglang.url, model, decodes, bench, seed + 1)
        report["runs"] = {"kvmesh": ours, "sglang_router": theirs}
        report["sglang_router_requests_to_worker_edges"] = _minus(
            await _edge_requests(edge_urls), before
        )
    finally:
        if sglang is not None:
            await sglang.stop()
        await mesh.stop()
    return report


async def sglang_router_version(python: str) -> str:
    """sglang_router's version under `python`, or SglangRouterError saying how to install it."""
    probe = "import sglang_router.launch_router, sglang_router.version as v; print(v.__version__)"
    try:
        process = await asyncio.create_subprocess_exec(
            python, "-c", probe, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
    except (OSError, TimeoutError) as e:
        raise SglangRouterError(f"cannot run {python!r} ({e!r}); {INSTALL_HINT}") from e
    if process.returncode != 0:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise SglangRouterError(
            f"{python!r} cannot import sglang_router ({last[0]}); {INSTALL_HINT}"
        )
    return out.decode().strip()


class SglangRouter:
    """sglang-router as a child process on free loopback ports.

    `start()` returns once its `/readiness` reports every worker healthy, and raises
    SglangRouterError — with its `/workers` view and the tail of its log — if that does not
    happen within `ready_timeout_s` or the process exits. `stop()` sends SIGTERM, then SIGKILL.
    """

    def __init__(
        self,
        python: str,
        worker_urls: Sequence[str],
        *,
        log_path: Path,
        ready_timeout_s: float,
        policy: str = "cache_aware",
    ) -> None:
        port, metrics_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.argv = [
            python, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
            "--port", str(port), "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(metrics_port), "--policy", policy,
            "--worker-urls", *worker_urls,
            # It polls a worker that is not ready yet every check interval, up to the timeout.
            "--worker-startup-timeout-secs", str(max(1, int(ready_timeout_s))),
            "--worker-startup-check-interval", "1",
            "--shutdown-grace-period-secs", "2",
        ]  # fmt: skip
        self._num_workers = len(worker_urls)
        self._log_path = log_path
        self._ready_timeout_s = ready_timeout_s
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self._log_path.open("ab") as log_file:  # the child keeps its own descriptor
            self._process = await asyncio.create_subprocess_exec(
                *self.argv, stdout=log_file, stderr=asyncio.subprocess.STDOUT
            )
        deadline = time.monotonic() + self._ready_timeout_s
        last = "no answer yet"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while time.monotonic() < deadline:
                if self._process.returncode is not None:
                    raise SglangRouterError(
                        f"sglang-router exited with code {self._process.returncode} while "
                        f"starting; {self._log_tail()}"
                    )
                try:
                    async with session.get(f"{self.url}/readiness") as response:
                        last = f"{response.status} {await response.text()}"
                        if response.status == 200 and self._all_healthy(last):
                            return
                except aiohttp.ClientError as e:
                    last = repr(e)
                await asyncio.sleep(_POLL_S)  # polling its readiness endpoint, bounded above
        workers = await self.workers()
        raise SglangRouterError(
            f"sglang-router did not report {self._num_workers} healthy workers within "
            f"{self._ready_timeout_s:.0f} s; last /readiness: {last}; /workers: "
            f"{json.dumps(workers)}; {self._log_tail()}"
        )

    def _all_healthy(self, readiness: str) -> bool:
        body = readiness.split(" ", 1)[1]
        with contextlib.suppress(ValueError, TypeError):
            return int(json.loads(body)["healthy_workers"]) >= self._num_workers
        return False

    async def workers(self) -> list[dict[str, Any]]:
        """Its `/workers` view (URL, model id, connection mode, health), trimmed to what tells."""
        keep = ("url", "model_id", "connection_mode", "worker_type", "is_healthy")
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(f"{self.url}/workers") as response,
            ):
                body = await response.json()
        except (aiohttp.ClientError, ValueError) as e:
            return [{"error": repr(e)}]
        return [{k: w.get(k) for k in keep} for w in body.get("workers", [])]

    async def stop(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    def _log_tail(self) -> str:
        try:
            lines = self._log_path.read_text(errors="replace").splitlines()
        except OSError:
            return f"no log at {self._log_path}"
        # Its own log lines about our readiness polling would hide the ones that say why.
        telling = [_ANSI.sub("", line) for line in lines if "/readiness" not in line]
        tail = "\n".join(telling[-_LOG_TAIL_LINES:])
        return f"its log ({self._log_path}) ends:\n{tail}"


def _free_port() -> int:
    """A port free now; sglang-router binds it moments later (a race we accept on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _pin_edges(mesh: Mesh, decodes: Sequence[Child]) -> dict[str, dict[str, str]]:
    """Per decode worker, a router that routes only to it and an edge in front of that router."""
    pinned = {}
    for child in decodes:
        worker_id = child.worker_id
        router = await mesh.add_router(
            f"router-pin-{child.name}", ["--only-workers", worker_id, "--policy", "cache_aware"]
        )
        edge = await mesh.add_edge(f"edge-pin-{child.name}", router)
        pinned[child.name] = {"worker_id": worker_id, "router": router, "edge": edge}
    return pinned


async def _first_model(edge_url: str) -> str:
    """The model our edge serves; sglang-router lists "unknown" instead, so name it explicitly."""
    async with aiohttp.ClientSession() as session, session.get(f"{edge_url}/v1/models") as r:
        body = await r.json()
    return str(body["data"][0]["id"])


async def _warm_up(edge_url: str, model: str) -> None:
    """One short request, so a run does not pay the engine's first-request cost."""
    request = {"model": model, "prompt": "Warm-up.", "max_tokens": 2, "temperature": 0}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session,
        session.post(f"{edge_url}/v1/completions", json=request) as response,
    ):
        if response.status != 200:
            raise RuntimeError(f"warm-up through {edge_url}: {await response.text()}")


async def _edge_requests(edge_urls: Sequence[str]) -> dict[str, int]:
    """What the pinned edges were asked, as "METHOD route status" -> count, over all of them.

    Our own scrapes of /metrics are left out. Paths no route matches are counted as "unmatched"
    (the edge keeps label values bounded), and HTTP/2 prefaces arrive as method PRI.
    """
    seen: dict[str, int] = {}
    for url in edge_urls:
        port = urlsplit(url).port
        assert port is not None, url
        for key, value in (await scrape(port)).items():
            labels = dict(_LABEL.findall(key)) if key.startswith(_EDGE_REQUESTS) else {}
            if labels and labels.get("route") != "/metrics":
                request = f"{labels.get('method')} {labels.get('route')} {labels.get('status')}"
                seen[request] = seen.get(request, 0) + int(value)
    return dict(sorted(seen.items()))


async def _decisions(router: Child) -> dict[str, int]:
    """The router's decisions so far, by reason ("prefix hit", "bounded load: ...", ...)."""
    port = router.metrics_port
    counts: dict[str, int] = {}
    for key, value in (await scrape(port)).items():
        if key.startswith("kvmesh_router_decisions_total{"):
            reason = dict(_LABEL.findall(key)).get("reason", "")
            counts[reason] = counts.get(reason, 0) + int(value)
    return counts


def _minus(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}


async def _measure(
    url: str, model: str, decodes: Sequence[Child], bench: CompareBench, seed: int
) -> dict[str, Any]:
    before = await requests_served(decodes, "kvmesh.v1.Decode")
    result = await load.run_async(
        load.BenchConfig(
            target=url,
            workload=bench.workload,
            arrivals=load.OpenLoop(rate=bench.rate),
            model=model,
            seed=seed,
            prompt_format="text",
            request_timeout_s=600,
        )
    )
    after = await requests_served(decodes, "kvmesh.v1.Decode")
    s = result.summary
    return {
        "target": url,
        "seed": seed,
        "requests": s.num_requests,
        "errors": s.num_errors,
        "error_messages": dict(list(s.errors.items())[:5]),
        "prompt_tokens": s.prompt_tokens,
        "cached_tokens": s.cached_tokens,
        "prefix_hit_rate": s.prefix_hit_rate,
        "ttft_p50_ms": s.ttft_ms.p50,
        "ttft_p90_ms": s.ttft_ms.p90,
        "ttft_p99_ms": s.ttft_ms.p99,
        "e2e_p50_ms": s.e2e_ms.p50,
        "served_per_worker": {k: n - before.get(k, 0) for k, n in after.items()},
    }
