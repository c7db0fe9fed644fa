"""Screenshots of kvmesh's dashboards from a mesh under load (docs/dashboards/*.png).

A mesh of sim workers on two clusters with the autoscaler and the control plane, a real
Prometheus (Debian's package) scraping it through the configuration `kvmesh up` writes, a few
minutes of mixed traffic through the edge with one decode worker killed half-way, then every
dashboard drawn with matplotlib from the same PromQL as the Grafana JSON
(`kvmesh.telemetry.render`): Grafana does not run on these machines.

    .venv/bin/python scripts/dashboard-screenshots.py --minutes 4
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import httpx

from kvmesh.telemetry.render import render
from kvmesh.up import Mesh, UpConfig

TOKEN = "screenshots"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def traffic(mesh: Mesh, seconds: float, rate: float) -> None:
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=60) as http:
        pending: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < seconds:
            shared = rng.random() < 0.6  # a shared system prompt: prefix hits
            content = ("You are a helpful assistant of the kvmesh project. " * 8 if shared else "")
            body = {
                "model": mesh.model_id,
                "messages": [{"role": "user", "content": content + f"Question {i}?"}],
                "max_tokens": rng.choice([16, 32, 64]),
                "stream": rng.random() < 0.5,
            }

            async def one(body: dict[str, object] = body) -> None:
                await http.post("/v1/chat/completions", json=body)

            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*pending)


async def main(minutes: float, rate: float, out: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise SystemExit("needs Debian's prometheus package: apt-get install prometheus")
    root = Path(tempfile.mkdtemp(prefix="kvmesh-dashboards-"))
    config = UpConfig(
        model="dummy:smollm2-135m",
        clusters=("us-east", "eu-west"),
        autoscale=True,
        admin_token=TOKEN,
        capacity=3,
        autoscaler_tick_s=1.0,
        registry_port=0,
        router_port=0,
        edge_port=free_port(),
        device="cpu",
        disagg_min_tokens=0,
        log_dir=root / "logs",
        restart=True,
        extra_worker_args=["--engine", "sim", "--engine-arg", "speed=0.5"],
    )
    mesh = Mesh(config)
    port = free_port()
    process = None
    try:
        await mesh.start()
        mesh.supervise()
        process = await asyncio.create_subprocess_exec(
            prometheus, f"--config.file={mesh.prometheus_config}",
            f"--storage.tsdb.path={root / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
            stdout=asyncio.subprocess.DEVNULL, stderr=(root / "prometheus.log").open("wb"),
        )  # fmt: skip
        began = time.time()
        half = minutes * 30
        await traffic(mesh, half, rate)
        routers = [c for c in mesh.children if c.name.startswith("router") and c.alive]
        if routers:
            routers[0].process.send_signal(signal.SIGKILL)  # supervision restarts it
        await traffic(mesh, half, rate)
        await asyncio.sleep(15)  # the last scrapes
        span = (time.time() - began) / 60
        for path in render(f"http://127.0.0.1:{port}", out, minutes=span):
            print(path)
    finally:
        if process is not None:
            process.terminate()
            await process.wait()
        await mesh.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=Path("docs/dashboards"))
    args = parser.parse_args()
    asyncio.run(main(args.minutes, args.rate, args.out))
