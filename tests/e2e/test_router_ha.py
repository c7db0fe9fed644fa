"""Router high availability: `kvmesh up --routers 2`. The edge finds both routers in the
registry and balances over them; killing one during 20 greedy streams loses none, and every
answer equals the one taken before the kill (the streams it carried resume on the other router
with `resume_token_ids`)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator

import httpx
import pytest

from kvmesh.telemetry.scrape import scrape, total
from kvmesh.up import Mesh
from tests.e2e.mesh import sim_mesh

STREAMS = 20
MAX_TOKENS = 48


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with sim_mesh(
        tmp_path_factory.mktemp("router-ha") / "logs",
        speed=0.5,  # slow enough that the streams are still running at the kill
        routers=2,
        num_decode=2,
        disagg_min_tokens=0,
    ) as running:
        yield running


async def stream(mesh: Mesh, i: int, started: asyncio.Event | None = None) -> str:
    """One greedy chat stream through the edge: its whole text."""
    body = {
        "model": mesh.model_id,
        "messages": [{"role": "user", "content": f"Stream {i}: count to one hundred."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    text = ""
    async with (
        httpx.AsyncClient(base_url=mesh.edge_url, timeout=120) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                if text and started is not None:
                    started.set()
    return text


async def routed(mesh: Mesh, name: str) -> float:
    return total(await scrape(mesh.child(name).metrics_port), "kvmesh_router_requests_total")


async def test_the_edge_balances_over_both_routers(mesh: Mesh) -> None:
    assert len(mesh.cluster_routers["dc1"]) == 2
    before = [await routed(mesh, n) for n in ("router", "router-1")]
    await asyncio.gather(*(stream(mesh, 100 + i) for i in range(6)))
    after = [await routed(mesh, n) for n in ("router", "router-1")]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


async def test_killing_a_router_mid_stream_loses_no_stream_and_changes_no_answer(
    mesh: Mesh,
) -> None:
    reference = await asyncio.gather(*(stream(mesh, i) for i in range(STREAMS)))
    assert all(len(text) > 0 for text in reference)
    started = asyncio.Event()
    running = [asyncio.create_task(stream(mesh, i, started)) for i in range(STREAMS)]
    await started.wait()
    mesh.child("router-1").process.send_signal(signal.SIGKILL)
    answers = await asyncio.gather(*running)
    assert answers == reference
    assert not mesh.child("router-1").alive
    async with httpx.AsyncClient(base_url=mesh.edge_url) as http:
        exposition = (await http.get("/metrics")).text
    moved = sum(
        float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith("kvmesh_edge_cluster_requests_total{")
        and 'outcome="failed_over"' in line
    )
    assert moved > 0  # some streams were on the killed router, and moved
