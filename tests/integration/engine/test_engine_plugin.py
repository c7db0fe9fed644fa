"""A plug-in engine, found by its entry point, serving the whole mesh: `--engine counting`.

The registry, a prefill and a decode worker running the example plug-in
(`tests/unit/engine/plugin_example`), and a router, as real processes on 127.0.0.1. The
plug-in moves its own KV (TransferMode.ENGINE): the router carries its opaque state from the
prefill worker to the decode worker, which continues the count.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from kvmesh.api.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.client import MeshClient
from kvmesh.rpc import open_channel
from kvmesh.telemetry.scrape import scrape, total
from kvmesh.up import Child, Mesh, UpConfig
from tests.unit.engine.test_registry import TESTS_ROOT, install_plugin


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    site = tmp_path_factory.mktemp("plugin-site")
    install_plugin(site)
    with pytest.MonkeyPatch.context() as patch:
        path = os.pathsep.join(
            p for p in (str(site), str(TESTS_ROOT), os.environ.get("PYTHONPATH")) if p
        )
        patch.setenv("PYTHONPATH", path)  # the workers' interpreters see the plug-in
        config = UpConfig(
            model="dummy:llama-tiny",  # the router's model: token ids only
            registry_port=0,
            router_port=0,
            edge_port=0,
            device="cpu",
            disagg_min_tokens=0,  # every request prefilled on the prefill worker
            log_dir=tmp_path_factory.mktemp("plugin-mesh") / "logs",
            start_timeout_s=120,
            extra_worker_args=["--engine", "counting", "--block-size", "4"],
        )
        running = Mesh(config)
        try:
            await running.start()
            yield running
        finally:
            await running.stop()


async def test_the_plugin_serves_disaggregated_requests(mesh: Mesh) -> None:
    decode = mesh.workers("decode")[0]
    imported_before = await _metric(decode, "kvmesh_engine_imported_tokens_total")
    async with MeshClient(mesh.router_address) as client:
        stream = client.generate(token_ids=list(range(20, 30)), max_tokens=6, temperature=0)
        tokens = [t async for chunk in stream for t in chunk.token_ids]
    assert tokens == [30, 31, 32, 33, 34, 35]  # the count goes on across the two workers
    imported = await _metric(decode, "kvmesh_engine_imported_tokens_total") - imported_before
    assert imported == 10  # the prompt's KV came from the prefill worker, engine to engine
    for tier in ("prefill", "decode"):
        (worker,) = mesh.workers(tier)
        async with open_channel(worker.address) as channel:
            info = await worker_pb2_grpc.WorkerStub(channel).GetInfo(worker_pb2.GetInfoRequest())
        assert (info.engine, info.nixl_agent) == ("counting", "")  # no NIXL agent: ENGINE mode


async def _metric(child: Child, name: str) -> float:
    return total(await scrape(child.metrics_port), name)
