"""A real Prometheus (Debian's `prometheus` package) scrapes a running mesh through the
configuration `kvmesh up` writes: the workers, routers and edge are found (HTTP service
discovery on the registry) and scraped, kvmesh's series arrive, and the alert rules load.
Skips, saying why, where the package is not installed."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvmesh.up import Mesh
from tests.e2e.mesh import sim_mesh

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="no prometheus binary: install Debian's package (apt-get install prometheus)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    root = tmp_path_factory.mktemp("prometheus")
    async with sim_mesh(root / "logs", speed=20, edge_port=free_port()) as running:
        yield running


@pytest.fixture(scope="module")
async def prometheus(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    assert PROMETHEUS is not None
    port = free_port()
    data = tmp_path_factory.mktemp("tsdb")
    process = await asyncio.create_subprocess_exec(
        PROMETHEUS,
        f"--config.file={mesh.prometheus_config}",
        f"--storage.tsdb.path={data}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=(Path(data) / "prometheus.log").open("wb"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if (await http.get("/-/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "prometheus did not become ready"
                await asyncio.sleep(0.2)  # polling its readiness endpoint
        yield url
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def query(http: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    response = await http.get("/api/v1/query", params={"query": expr})
    result: list[dict[str, Any]] = response.json()["data"]["result"]
    return result


async def test_prometheus_scrapes_the_mesh_and_loads_the_alerts(
    mesh: Mesh, prometheus: str
) -> None:
    body = {"model": mesh.model_id, "prompt": "Hello there", "max_tokens": 4}
    async with (
        httpx.AsyncClient(base_url=prometheus, timeout=10) as http,
        httpx.AsyncClient(base_url=mesh.edge_url, timeout=30) as edge,
    ):
        deadline = time.monotonic() + 90
        while True:
            assert (await edge.post("/v1/completions", json=body)).status_code == 200
            up = await query(http, "up == 1")
            services = {r["metric"].get("service") for r in up}
            served = await query(http, "sum(kvmesh_router_requests_total)")
            if {"kvmesh-edge", "kvmesh-router", "kvmesh-prefill", "kvmesh-decode"} <= services and (
                served and float(served[0]["value"][1]) > 0
            ):
                break
            assert time.monotonic() < deadline, (services, served)
            await asyncio.sleep(1)  # scrapes come every 5 s
        rules = (await http.get("/api/v1/rules")).json()["data"]["groups"]
    assert [g["name"] for g in rules] == ["kvmesh"]
    assert len(rules[0]["rules"]) >= 10
