"""The registry killed with SIGKILL under load (`kvmesh up` restarts it from its data
directory): no request fails, and cordons, policies, pins and desired counts are the same
after the restart."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from kvmesh.discovery import Discovery
from kvmesh.discovery.keys import CORDON_PREFIX, DESIRED_PREFIX, PINNED_PREFIX, POLICY_PREFIX
from kvmesh.up import Mesh
from tests.e2e.mesh import sim_mesh

DURABLE = {
    f"{CORDON_PREFIX}elsewhere": "1",
    f"{POLICY_PREFIX}m/decode": json.dumps({"min_replicas": 1, "max_replicas": 3}),
    f"{PINNED_PREFIX}m/decode/dc1": "2",
    f"{DESIRED_PREFIX}m/decode": json.dumps({"desired": 2}),
}


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with sim_mesh(
        tmp_path_factory.mktemp("registry-restart") / "logs", speed=20, restart=True
    ) as running:
        running.supervise()
        yield running


async def kv(mesh: Mesh) -> dict[str, bytes]:
    async with Discovery(mesh.registry_address) as discovery:
        _, entries = await discovery.kv_list("kvmesh/")
    return {e.key: e.value for e in entries if not e.key.startswith("kvmesh/workers/")}


async def test_registry_kill_9_under_load_loses_no_request_and_no_state(mesh: Mesh) -> None:
    async with Discovery(mesh.registry_address) as discovery:
        for key, value in DURABLE.items():
            assert await discovery.kv_put(key, value)
    before = await kv(mesh)
    restarted = asyncio.Event()
    under_load = asyncio.Event()
    outcomes: list[int] = []

    async def load() -> None:
        body = {"model": mesh.model_id, "prompt": "Hello there", "max_tokens": 8}
        async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=30) as http:
            ends = None
            while ends is None or time.monotonic() < ends:
                outcomes.append((await http.post("/v1/completions", json=body)).status_code)
                if len(outcomes) >= 8:
                    under_load.set()
                if ends is None and restarted.is_set():
                    ends = time.monotonic() + 3  # and a while after the restart

    workers = [asyncio.create_task(load()) for _ in range(4)]
    await under_load.wait()  # kill under it
    mesh.child("registry").process.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 60
    while mesh.restarts.get("registry", 0) == 0:
        assert time.monotonic() < deadline, "the registry was not restarted"
        await asyncio.sleep(0.1)  # polling the supervisor
    restarted.set()
    await asyncio.gather(*workers)
    assert outcomes and set(outcomes) == {200}, sorted(set(outcomes))
    after = await kv(mesh)
    assert {k: after.get(k) for k in DURABLE} == {k: before[k] for k in DURABLE}
