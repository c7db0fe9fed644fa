"""`kvmesh up`: the whole mesh on one machine, as separate processes.

    embedded registry -> prefill and decode workers -> router -> HTTP edge

Each child prints one line when it serves (`... serving ADDRESS` / `edge listening on URL`);
`up` waits for those lines, then for the edge's /health to say a request can be served, prints
the endpoints, and on Ctrl-C or SIGTERM stops the children in reverse order (SIGTERM, a grace
period, then SIGKILL). Children's logs go to files under `--log-dir`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp
import structlog

from kvmesh.engine import loader

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class UpConfig:
    model: str = "smollm2"
    num_prefill: int = 1
    num_decode: int = 1
    host: str = "127.0.0.1"
    registry_port: int = 8500
    router_port: int = 50051
    edge_port: int = 8000
    disagg_min_tokens: int = 64
    device: str = "auto"
    log_dir: Path = field(default_factory=lambda: Path(".kvmesh/logs"))
    start_timeout_s: float = 300.0
    grace_s: float = 10.0
    extra_worker_args: list[str] = field(default_factory=list)
    extra_router_args: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Child:
    """One child process and the line it printed when it started serving.

    Workers print `<tier> serving ADDRESS worker_id=ID metrics_port=PORT`, routers
    `router serving ADDRESS metrics_port=PORT`, the edge `edge listening on URL`.
    """

    name: str
    process: asyncio.subprocess.Process
    log_file: IO[bytes]
    ready_line: str = ""

    @property
    def address(self) -> str:
        """The gRPC address of a worker or router (the edge's URL for the edge)."""
        return self.ready_line.split()[-1] if self.name.startswith("edge") else self._word(2)

    @property
    def metrics_port(self) -> int:
        return int(self._field("metrics_port"))

    @property
    def worker_id(self) -> str:
        return self._field("worker_id")

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def _word(self, index: int) -> str:
        return self.ready_line.split()[index]

    def _field(self, key: str) -> str:
        for word in self.ready_line.split():
            if word.startswith(key + "="):
                return word.split("=", 1)[1]
        raise ValueError(f"{self.name} printed no {key}: {self.ready_line!r}")


class Mesh:
    """The running children; `start()` then `wait()`; `stop()` from anywhere."""

    def __init__(self, config: UpConfig) -> None:
        self.config = config
        self.children: list[Child] = []
        self.router_address = ""
        self.edge_url = ""
        self.registry_address = ""
        self._stopping = asyncio.Event()
        self._worker_args: list[str] = []
        self._drains: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        config = self.config
        config.log_dir.mkdir(parents=True, exist_ok=True)
        # Convert the model once here, so the workers don't all do it at the same time.
        await asyncio.to_thread(loader.resolve, config.model)
        py = [sys.executable, "-m"]
        registry = await self._spawn(
            "registry",
            [*py, "kvmesh.cli", "registry", "--host", config.host, "--port",
             str(config.registry_port)],
            "kvmesh registry:",
        )  # fmt: skip
        self.registry_address = registry.ready_line.rsplit("http://", 1)[1]
        workers = config.num_prefill + config.num_decode
        threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
        common = [
            "--registry", self.registry_address, "--model", config.model, "--host", config.host,
            "--torch-threads", str(threads), "--metrics-port", "0", *config.extra_worker_args,
        ]  # fmt: skip
        self._worker_args = common
        names = [
            (tier, f"{tier}-{i}")
            for tier, count in (("prefill", config.num_prefill), ("decode", config.num_decode))
            for i in range(count)
        ]
        devices = worker_devices(config.device, len(names))
        starting = [
            self._spawn(
                name, [*py, f"services.{tier}", *common, "--device", device], f"{tier} serving"
            )
            for (tier, name), device in zip(names, devices, strict=True)
        ]
        router_args = ["--port", str(config.router_port), *config.extra_router_args]
        starting.append(self._spawn("router", self._router_argv(router_args), "router serving"))
        started = await asyncio.gather(*starting)
        self.router_address = started[-1].address
        edge = await self._spawn(
            "edge",
            [*py, "services.edge", "--host", config.host, "--port", str(config.edge_port),
             "--router", self.router_address],
            "edge listening on",
        )  # fmt: skip
        self.edge_url = edge.address
        await self._wait_until_serving()

    async def add_router(self, name: str, args: list[str]) -> str:
        """Start another router on the same registry (e.g. another policy); its address."""
        child = await self._spawn(name, self._router_argv(["--port", "0", *args]), "router serving")
        return child.address

    async def add_worker(self, tier: str, name: str, args: Sequence[str] = ()) -> Child:
        """Start another worker (a replacement, or one with other flags) after `start()`."""
        device = worker_devices(self.config.device, 1)[0]
        argv = [sys.executable, "-m", f"services.{tier}", *self._worker_args, "--device", device]
        return await self._spawn(name, [*argv, *args], f"{tier} serving")

    async def add_edge(self, name: str, router_address: str) -> str:
        """Start another HTTP edge in front of a router; its URL."""
        argv = [sys.executable, "-m", "services.edge", "--host", self.config.host, "--port", "0",
                "--router", router_address]  # fmt: skip
        child = await self._spawn(name, argv, "edge listening on")
        return child.address

    def _router_argv(self, args: list[str]) -> list[str]:
        config = self.config
        return [
            sys.executable, "-m", "services.router", "--registry", self.registry_address,
            "--model", config.model, "--host", config.host,
            "--disagg-min-tokens", str(config.disagg_min_tokens), "--metrics-port", "0", *args,
        ]  # fmt: skip

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def workers(self, tier: str) -> list[Child]:
        """The live workers of a tier (those added later included)."""
        return [c for c in self.children if c.name.startswith(tier) and c.alive]

    async def wait(self) -> None:
        """Until stop() is called (a signal) — children that die are reported, not restarted."""
        watchers = [asyncio.create_task(self._report_exit(c)) for c in self.children]
        await self._stopping.wait()
        for task in watchers:
            task.cancel()

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        for child in reversed(self.children):
            if child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.process.wait(), self.config.grace_s + 5)
            except TimeoutError:
                log.warning("child did not stop in time; killing it", child=child.name)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()
            child.log_file.close()

    async def _spawn(self, name: str, argv: list[str], ready_prefix: str) -> Child:
        log_path = self.config.log_dir / f"{name}.log"
        log_file = log_path.open("ab")
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=log_file, start_new_session=True
        )
        child = Child(name, process, log_file)
        self.children.append(child)
        assert process.stdout is not None
        deadline = time.monotonic() + self.config.start_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(process.stdout.readline(), max(remaining, 0.01))
            except TimeoutError:
                raise RuntimeError(f"{name} did not start in time; see {log_path}") from None
            if not line:
                raise RuntimeError(f"{name} exited while starting; see {log_path}")
            text = line.decode().strip()
            if text.startswith(ready_prefix):
                child.ready_line = text
                self._drains.append(asyncio.create_task(_drain(process.stdout)))
                return child

    async def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{self.edge_url}/health") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.2)  # polling the edge's health endpoint
        raise RuntimeError("the mesh did not become ready in time")

    async def _report_exit(self, child: Child) -> None:
        code = await child.process.wait()
        if not self._stopping.is_set():
            print(f"kvmesh up: {child.name} exited with code {code}", file=sys.stderr)


def worker_devices(device: str, num_workers: int) -> list[str]:
    """Each worker's device: `cuda` (or `auto` with GPUs) spreads the workers over the GPUs,
    prefill workers first, so one prefill and one decode worker on two GPUs get one each."""
    import torch

    gpus = torch.cuda.device_count()
    if device not in ("cuda", "auto") or gpus == 0:
        return [device] * num_workers
    return [f"cuda:{i % gpus}" for i in range(num_workers)]


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


def banner(mesh: Mesh) -> str:
    url = mesh.edge_url
    model = "SmolLM2-135M-Instruct" if mesh.config.model == "smollm2" else mesh.config.model
    return f"""
kvmesh is up: {mesh.config.num_prefill} prefill + {mesh.config.num_decode} decode worker(s)
  OpenAI-compatible HTTP  {url}/v1   (health {url}/health, metrics {url}/metrics)
  gRPC Generation API     {mesh.router_address}
  registry (Consul API)   http://{mesh.registry_address}
  logs                    {mesh.config.log_dir}/

Try it:
  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi!"}}]}}'

  curl -sN {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "stream": true, "messages": [{{"role": "user", "content": "Hi!"}}]}}'

  python -c 'from openai import OpenAI
c = OpenAI(base_url="{url}/v1", api_key="none")
print(c.chat.completions.create(model="{model}",
      messages=[{{"role": "user", "content": "Tell me a joke"}}]).choices[0].message.content)'

Ctrl-C stops everything.
"""


async def run(config: UpConfig) -> None:
    mesh = Mesh(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, mesh.request_stop)
    try:
        starting = asyncio.create_task(mesh.start())
        stop_wait = asyncio.create_task(mesh._stopping.wait())
        done, _ = await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            stop_wait.cancel()
            starting.result()
            print(banner(mesh), flush=True)
            await mesh.wait()
        else:
            starting.cancel()
    finally:
        print("kvmesh up: stopping ...", file=sys.stderr, flush=True)
        await mesh.stop()
        print("kvmesh up: stopped", file=sys.stderr, flush=True)
