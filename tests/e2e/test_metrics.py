"""Metrics that are recorded: after traffic through the edge, every metric kvmesh declares is
exported by some service of the mesh; and SLA-mode autoscaling acts on the router's TTFT.

The mesh: sim workers under `kvmesh up --autoscale` (the control plane starts them), so the
edge, router, autoscaler, control plane and both worker tiers all run.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.metrics import MetricWrapperBase

from kvmesh.api.v1 import autoscaler_pb2, autoscaler_pb2_grpc, common_pb2
from kvmesh.discovery import Discovery
from kvmesh.rpc import open_channel
from kvmesh.telemetry import metrics
from kvmesh.telemetry.scrape import scrape
from kvmesh.up import Mesh
from tests.e2e.mesh import sim_mesh

TOKEN = "metrics-token"
SERVICES = (
    "kvmesh-router",
    "kvmesh-prefill",
    "kvmesh-decode",
    "kvmesh-autoscaler",
    "kvmesh-controlplane",
)


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with sim_mesh(
        tmp_path_factory.mktemp("metrics") / "logs",
        speed=1,  # an H100's pace: TTFTs of milliseconds
        autoscale=True,
        admin_token=TOKEN,
        autoscaler_tick_s=0.5,
        capacity=2,
        disagg_min_tokens=0,  # every request prefilled on the prefill tier
    ) as running:
        yield running


def declared() -> dict[str, str]:
    """Every metric kvmesh declares: exposition name -> kind."""
    found: dict[str, str] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name
            found[name + ("_total" if value._type == "counter" else "")] = value._type
    found |= {name: "counter" for name in metrics.ENGINE_COUNTERS}
    found |= {name: "gauge" for name in metrics.ENGINE_GAUGES}
    return found


async def traffic(mesh: Mesh, requests: int) -> None:
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=60) as http:
        for i in range(requests):
            body = {
                "model": mesh.model_id,
                "messages": [{"role": "user", "content": f"Request {i}: tell me a story."}],
                "max_tokens": 8,
                "stream": i % 2 == 0,
            }
            response = await http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text


async def every_services_metrics(mesh: Mesh) -> dict[str, dict[str, float]]:
    """Each service's scraped /metrics, found through the registry (`metrics_port` meta), and
    the edge's."""
    scraped: dict[str, dict[str, float]] = {}
    async with Discovery(mesh.registry_address) as discovery:
        for service in SERVICES:
            _, instances = await discovery.healthy(service)
            for instance in instances:
                port = instance.meta.get("metrics_port", "")
                if port.isdigit():
                    scraped[service] = scraped.get(service, {}) | await scrape(
                        int(port), instance.address
                    )
    async with httpx.AsyncClient(base_url=mesh.edge_url) as http:
        text = (await http.get("/metrics")).text
    scraped["edge"] = {line.split(" ")[0]: 0.0 for line in text.splitlines() if line[:1] != "#"}
    return scraped


async def test_every_declared_metric_is_exported_after_traffic(mesh: Mesh) -> None:
    await traffic(mesh, 6)
    deadline = time.monotonic() + 30
    while "kvmesh_autoscaler_desired_replicas" not in str(
        scraped := await every_services_metrics(mesh)
    ):  # the autoscaler sets its gauges on each tick
        assert time.monotonic() < deadline, "the autoscaler set no gauge"
        await asyncio.sleep(0.2)  # polling its /metrics
    assert {*SERVICES[:4], "edge"} <= set(scraped), sorted(scraped)
    names = {re.split(r"[{ ]", key)[0] for samples in scraped.values() for key in samples}
    exported = set()
    for name, kind in declared().items():
        suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
        if any(name + suffix in names for suffix in suffixes):
            exported.add(name)
    assert sorted(set(declared()) - exported) == []


async def test_sla_mode_scales_prefill_up_when_p90_ttft_is_over_target(mesh: Mesh) -> None:
    """A TTFT target below what the router measures: the autoscaler asks for another prefill
    replica, and its reason names the measured p90."""
    await mesh.set_policy(
        "prefill",
        mode=autoscaler_pb2.SCALING_MODE_SLA,
        target_ttft_s=0.0001,  # 0.1 ms: below any TTFT through the mesh
        min_replicas=1,
        max_replicas=2,
        window_s=5.0,
    )
    deadline = time.monotonic() + 90
    async with open_channel(mesh.autoscaler_address, wait_for_ready=False) as channel:
        stub = autoscaler_pb2_grpc.AutoscalerStub(channel)
        while True:
            await traffic(mesh, 2)  # keeps TTFT samples in the window
            response = await stub.ListDecisions(
                autoscaler_pb2.ListDecisionsRequest(model=mesh.model_id, limit=20),
                metadata=[("authorization", f"Bearer {TOKEN}")],
            )
            ups = [  # decisions of SLA mode (they read the p90) that scale up
                d
                for d in response.decisions
                if d.tier == common_pb2.TIER_PREFILL
                and "observed_s" in d.inputs
                and d.desired_replicas > d.current_replicas
            ]
            if ups:
                break
            assert time.monotonic() < deadline, [d.reason for d in response.decisions]
    decision = ups[0]
    measured = decision.inputs["observed_s"]
    assert measured > 0.0001
    assert f"p90 TTFT {measured:.3f} s against a 0.0001 s target" in decision.reason
