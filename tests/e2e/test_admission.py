"""Admission under a burst, as real processes (sim workers): past the router's --max-in-flight
and --max-queue, requests are refused at once with 429 (the router's RESOURCE_EXHAUSTED), the
admitted ones complete, nothing hangs, and the mesh serves on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from kvmesh.up import Mesh
from tests.e2e.mesh import sim_mesh


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with sim_mesh(
        tmp_path_factory.mktemp("admission") / "logs",
        speed=0.5,
        num_prefill=0,
        extra_router_args=["--max-in-flight", "2", "--max-queue", "2"],
    ) as running:
        yield running


async def chat(http: httpx.AsyncClient, model: str) -> int:
    response = await http.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32},
    )
    if response.status_code == 429:
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        assert "router queue full" in response.json()["error"]["message"]
    return response.status_code


async def test_a_burst_past_the_queue_gets_429_and_nothing_hangs(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=60) as http:
        statuses = await asyncio.wait_for(
            asyncio.gather(*(chat(http, mesh.model_id) for _ in range(16))), 60
        )
        assert set(statuses) <= {200, 429}
        assert statuses.count(429) >= 1 and statuses.count(200) >= 4  # 2 running + 2 queued
        assert await chat(http, mesh.model_id) == 200  # and it serves on
