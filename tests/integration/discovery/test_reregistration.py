"""A registry that restarts without its data forgets every instance; each comes back by itself
(`Registrar`): a TTL heartbeat that fails registers again, and an instance with a gRPC check
asks whether the registry still knows it and registers again if not."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvmesh.discovery import Discovery, Registration, registrar
from kvmesh.discovery.registrar import Registrar
from kvmesh.discovery.registry import EmbeddedRegistry


@pytest.mark.parametrize("check", ["ttl", "grpc"])
async def test_instances_register_again_after_a_registry_restart_without_data(
    check: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registrar, "PRESENCE_CHECK_S", 0.2)
    registration = Registration(
        name="kvmesh-decode",
        service_id=f"decode-{check}",
        address="127.0.0.1",
        port=9,
        ttl_s=0.6 if check == "ttl" else None,
        grpc_check_interval_s=10.0 if check == "grpc" else None,
    )
    first = EmbeddedRegistry(port=0)
    await first.start()
    port = int(first.address().rpartition(":")[2])
    async with Discovery(first.address()) as discovery:
        keeper = Registrar(discovery, registration)
        await keeper.start()
        await first.stop()  # forgets everything
        async with EmbeddedRegistry(port=port):
            deadline = time.monotonic() + 10
            while not await discovery.is_registered(registration.service_id):
                assert time.monotonic() < deadline, "the instance did not register again"
                await asyncio.sleep(0.1)  # polling the new registry
            await keeper.stop()
