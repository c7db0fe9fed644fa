"""Meshes shared by several end-to-end modules (started once per test session)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kvmesh.up import Mesh, UpConfig


@pytest.fixture(scope="session")
async def secure_mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    """`kvmesh up --secure` on free ports: mutual TLS, registry ACLs, HTTPS edge with keys."""
    root = tmp_path_factory.mktemp("secure")
    config = UpConfig(
        registry_port=0,
        router_port=0,
        edge_port=0,
        device="cpu",
        disagg_min_tokens=0,  # every request prefilled on the prefill worker
        log_dir=root / "logs",
        tls_dir=root / "tls",  # certificates and secrets made by `up`
        secure=True,
        extra_worker_args=["--num-blocks", "512"],
    )
    running = Mesh(config)
    try:
        await running.start()
        yield running
    finally:
        await running.stop()
