"""`kvmesh up --autoscale`: the autoscaler and the control plane own the decode tier.

Scale to zero and wake, through every piece: the policy set over the autoscaler's RPC, the
control plane draining the idle replica, a request through the edge waiting at the router
(which writes the wake key), the autoscaler waking the tier, the control plane starting a
worker, the request served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from kvmesh.api.v1 import common_pb2, controlplane_pb2, controlplane_pb2_grpc
from kvmesh.up import Mesh, UpConfig

TOKEN = "e2e-token"


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    config = UpConfig(
        num_prefill=0, num_decode=1, registry_port=0, router_port=0, edge_port=0,
        device="cpu", log_dir=tmp_path / "logs", autoscale=True, admin_token=TOKEN,
        autoscaler_tick_s=0.5, capacity=2,
        extra_worker_args=["--num-blocks", "256", "--ttl-s", "1"],
        extra_router_args=["--disagg-min-tokens", "100000"],
    )  # fmt: skip
    running = Mesh(config)
    try:
        await running.start()
        yield running
    finally:
        await running.stop()


async def decode_workers(mesh: Mesh) -> list[controlplane_pb2.WorkerSummary]:
    async with grpc.aio.insecure_channel(mesh.controlplane_address) as channel:
        response = await controlplane_pb2_grpc.ControlPlaneStub(channel).ListWorkers(
            controlplane_pb2.ListWorkersRequest(),
            metadata=[("authorization", f"Bearer {TOKEN}")],
        )
    return [w for w in response.workers if w.tier == common_pb2.TIER_DECODE]


async def test_an_idle_tier_scales_to_zero_and_the_next_request_wakes_it(mesh: Mesh) -> None:
    assert len(await decode_workers(mesh)) == 1
    await mesh.set_policy("decode", min_replicas=0, window_s=1.0, scale_down_delay_s=2.0)
    deadline = time.monotonic() + 120
    while await decode_workers(mesh):  # drained and removed after the delay
        assert time.monotonic() < deadline, "the idle decode tier did not reach zero"
        await asyncio.sleep(0.2)  # polling the control plane

    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 4}
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=180) as http:
        response = await http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4
    assert len(await decode_workers(mesh)) == 1
