"""The embedded registry with ACLs on: writes need the bootstrap token (403 "Permission denied"
without it, as Consul answers), reads are open unless configured otherwise, and kvmesh's own
client passes the token from Consul's environment variables."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from kvmesh.discovery import Discovery, Registration
from kvmesh.discovery.registry import EmbeddedRegistry
from kvmesh.discovery.registry.acl import AclConfig

TOKEN = "s3cret-bootstrap-token"


@pytest.fixture
async def registry() -> AsyncIterator[EmbeddedRegistry]:
    async with EmbeddedRegistry(port=0, acl=AclConfig(TOKEN)) as started:
        yield started


async def test_writes_need_the_token_and_reads_do_not(registry: EmbeddedRegistry) -> None:
    async with httpx.AsyncClient(base_url=f"http://{registry.address()}") as http:
        put = await http.put("/v1/kv/kvmesh/controlplane/cordon/dc1", content=b"1")
        register = await http.put(
            "/v1/agent/service/register", json={"Name": "kvmesh-prefill", "Port": 1}
        )
        wrong = await http.put("/v1/kv/x", content=b"1", headers={"X-Consul-Token": "not-" + TOKEN})
        assert (put.status_code, put.text) == (403, "Permission denied")
        assert register.status_code == 403 and wrong.status_code == 403
        assert (await http.get("/v1/kv/kvmesh/controlplane/cordon/dc1")).status_code == 404
        for headers, query in (
            ({"X-Consul-Token": TOKEN}, {}),
            ({"Authorization": f"Bearer {TOKEN}"}, {}),
            ({}, {"token": TOKEN}),
        ):
            ok = await http.put("/v1/kv/x", content=b"1", headers=headers, params=query)
            assert ok.status_code == 200, ok.text
        assert (await http.get("/v1/catalog/services")).status_code == 200


async def test_reads_can_require_the_token_too() -> None:
    acl = AclConfig(TOKEN, reads_need_token=True)
    async with EmbeddedRegistry(port=0, acl=acl) as started:
        http = httpx.AsyncClient(base_url=f"http://{started.address()}")
        async with http:
            assert (await http.get("/v1/catalog/services")).status_code == 403
            allowed = await http.get("/v1/catalog/services", headers={"X-Consul-Token": TOKEN})
            assert allowed.status_code == 200


async def test_the_client_takes_its_token_from_consuls_environment(
    registry: EmbeddedRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registration = Registration(
        name="kvmesh-decode", service_id="d1", address="127.0.0.1", port=9, ttl_s=30
    )
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    monkeypatch.delenv("CONSUL_HTTP_TOKEN_FILE", raising=False)
    async with Discovery(registry.address()) as anonymous:
        with pytest.raises(Exception, match=r"Permission denied|403"):
            await anonymous.register(registration)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN_FILE", str(token_file))
    async with Discovery(registry.address()) as trusted:
        await trusted.register(registration)
        await trusted.deregister("d1")
