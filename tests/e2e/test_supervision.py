"""`kvmesh up` supervision: a child that dies is started again, with backoff, on the port it
had, and the mesh serves on through the edge."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from kvmesh.up import Child, Mesh
from tests.e2e.mesh import sim_mesh


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with sim_mesh(
        tmp_path_factory.mktemp("supervision") / "logs", speed=20, restart=True
    ) as running:
        running.supervise()
        yield running


async def ask(mesh: Mesh) -> httpx.Response:
    body = {"model": mesh.model_id, "prompt": "Hello there", "max_tokens": 4}
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=30) as http:
        return await http.post("/v1/completions", json=body)


async def killed_and_back(mesh: Mesh, name: str) -> Child:
    """SIGKILL the child; the new one, once it is ready."""
    dead = mesh.child(name)
    restarts = mesh.restarts.get(name, 0)
    dead.process.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 60
    while mesh.restarts.get(name, 0) == restarts:
        assert time.monotonic() < deadline, f"{name} was not restarted"
        await asyncio.sleep(0.1)  # polling the supervisor's state
    child = mesh.child(name)
    assert child is not dead and child.alive
    return child


async def test_a_killed_decode_worker_is_restarted_and_serves(mesh: Mesh) -> None:
    assert (await ask(mesh)).status_code == 200
    await killed_and_back(mesh, "decode-0")
    deadline = time.monotonic() + 60
    while (response := await ask(mesh)).status_code != 200:  # until the router sees it again
        assert time.monotonic() < deadline, response.text
        await asyncio.sleep(0.2)  # polling until the router sees the worker again
    assert response.json()["usage"]["completion_tokens"] == 4


async def test_a_killed_router_comes_back_on_its_address(mesh: Mesh) -> None:
    address = mesh.child("router").address
    router = await killed_and_back(mesh, "router")
    assert router.address == address  # the edge's channel finds it where it was
    deadline = time.monotonic() + 60
    while (response := await ask(mesh)).status_code != 200:
        assert time.monotonic() < deadline, response.text
        await asyncio.sleep(0.2)  # polling until the edge reconnects to the router
    log = (mesh.config.log_dir / "router.log").read_text()
    assert log  # the new process appends to the same log
