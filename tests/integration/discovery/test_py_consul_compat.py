"""py-consul, unmodified, against the embedded registry: the asyncio client and the synchronous
one (run in a thread so that the registry's event loop keeps serving)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import consul
import consul.aio
import pytest

from kvmesh.discovery.registry import EmbeddedRegistry
from tests.integration.discovery.conftest import HealthServer, elapsed


def _host_port(registry: EmbeddedRegistry, datacenter: str = "dc1") -> tuple[str, int]:
    host, _, port = registry.address(datacenter).rpartition(":")
    return host, int(port)


@pytest.fixture
async def client(registry: EmbeddedRegistry) -> AsyncIterator[Any]:
    host, port = _host_port(registry)
    async with consul.aio.Consul(host=host, port=port) as c:
        yield c


async def test_register_pass_and_read_health(client: Any) -> None:
    registered = await client.agent.service.register(
        "web",
        service_id="web-1",
        address="127.0.0.1",
        port=9000,
        tags=["model=smollm2"],
        meta={"engine": "torch"},
        check=consul.Check.ttl("10s"),
    )
    assert registered is True
    index, nodes = await client.health.service("web", passing=True)
    assert nodes == []  # a new TTL check is critical
    assert await client.agent.check.ttl_pass("service:web-1", notes="warm") is True
    new_index, nodes = await client.health.service("web", passing=True)
    assert int(new_index) > int(index)
    [node] = nodes
    assert node["Service"]["ID"] == "web-1"
    assert node["Service"]["Meta"] == {"engine": "torch"}
    assert node["Node"]["Datacenter"] == "dc1"
    services = await client.agent.services()
    assert services["web-1"]["Tags"] == ["model=smollm2"]
    checks = await client.agent.checks()
    assert checks["service:web-1"]["Output"] == "warm"
    assert await client.agent.service.deregister("web-1") is True
    _, nodes = await client.health.service("web")
    assert nodes == []


async def test_blocking_health_query_wakes_on_change_and_times_out(client: Any) -> None:
    await client.agent.service.register("web", service_id="web-1", check=consul.Check.ttl("10s"))
    await client.agent.check.ttl_pass("service:web-1")
    index, nodes = await client.health.service("web", passing=True)
    assert len(nodes) == 1

    (same_index, nodes), took = await elapsed(
        client.health.service("web", passing=True, index=index, wait="1s")
    )
    assert same_index == index and len(nodes) == 1
    assert took >= 0.9

    blocked = asyncio.create_task(
        client.health.service("web", passing=True, index=index, wait="20s")
    )
    assert await client.status.leader() == "127.0.0.1:8300"
    assert await client.agent.check.ttl_fail("service:web-1", notes="broken") is True
    (new_index, nodes), took = await elapsed(blocked)
    assert took < 5
    assert int(new_index) > int(index) and nodes == []


async def test_kv_with_cas_and_blocking_get(client: Any) -> None:
    assert await client.kv.put("policies/prefill", "min=1", cas=0) is True
    assert await client.kv.put("policies/prefill", "min=2", cas=0) is False
    index, item = await client.kv.get("policies/prefill")
    assert item["Value"] == b"min=1"
    assert await client.kv.put("policies/prefill", "min=3", cas=item["ModifyIndex"]) is True

    index, item = await client.kv.get("policies/prefill")
    blocked = asyncio.create_task(client.kv.get("policies/prefill", index=index, wait="20s"))
    assert await client.catalog.datacenters() == ["dc1", "dc2"]
    assert await client.kv.put("policies/prefill", b"min=4") is True
    (new_index, item), took = await elapsed(blocked)
    assert took < 5
    assert int(new_index) > int(index)
    assert item["Value"] == b"min=4"

    _, keys = await client.kv.get("policies/", keys=True)
    assert keys == ["policies/prefill"]
    _, items = await client.kv.get("policies/", recurse=True)
    assert [i["Key"] for i in items] == ["policies/prefill"]
    assert await client.kv.delete("policies/", recurse=True) is True
    _, item = await client.kv.get("policies/prefill")
    assert item is None


async def test_datacenters_agent_self_and_dc_parameter(
    client: Any, registry: EmbeddedRegistry
) -> None:
    assert await client.catalog.datacenters() == ["dc1", "dc2"]
    me = await client.agent.self()
    assert me["Config"]["Datacenter"] == "dc1"
    host, port = _host_port(registry, "dc2")
    async with consul.aio.Consul(host=host, port=port) as dc2:
        await dc2.agent.service.register("decode", check=consul.Check.ttl("10s"))
        assert (await dc2.agent.self())["Config"]["Datacenter"] == "dc2"
    _, nodes = await client.health.service("decode", dc="dc2")
    assert [n["Node"]["Datacenter"] for n in nodes] == ["dc2"]
    _, nodes = await client.health.service("decode")
    assert nodes == []
    assert await client.kv.put("k", "v", dc="dc2") is True
    _, item = await client.kv.get("k", dc="dc2")
    assert item["Value"] == b"v"
    _, item = await client.kv.get("k")
    assert item is None


async def test_a_grpc_check_from_py_consul(client: Any, health_server: HealthServer) -> None:
    await health_server.set("", True)
    check = consul.Check.grpc(health_server.address, "100ms", use_tls=False, timeout="1s")
    assert await client.agent.service.register("worker", check=check) is True
    index, nodes = await client.health.service("worker", passing=True)
    while not nodes:  # blocking queries, each returning on the next change
        index, nodes = await client.health.service("worker", passing=True, index=index, wait="5s")
    assert nodes[0]["Checks"][1]["Type"] == "grpc"


async def test_refusals_reach_py_consul_as_its_errors(client: Any) -> None:
    with pytest.raises(consul.ConsulException, match="not supported by the embedded registry"):
        await client.agent.service.register("web", check=consul.Check.http("http://x", "1s"))
    assert await client.agent.check.ttl_pass("nope") is False  # py-consul's reading of a 404


async def test_the_synchronous_client(registry: EmbeddedRegistry) -> None:
    # In a thread: the registry serves from this test's event loop, which must keep running.
    host, port = _host_port(registry)
    result = await asyncio.to_thread(_sync_session, host, port)
    assert result == "ok"


def _sync_session(host: str, port: int) -> str:
    c = consul.Consul(host=host, port=port)
    assert c.agent.service.register("web", service_id="web-1", check=consul.Check.ttl("10s"))
    assert c.agent.check.ttl_pass("service:web-1")
    index, nodes = c.health.service("web", passing=True)
    assert [n["Service"]["ID"] for n in nodes] == ["web-1"]
    same, _ = c.health.service("web", passing=True, index=index, wait="1s")  # times out
    assert same == index
    assert c.kv.put("k", "v1", cas=0)
    kv_index, item = c.kv.get("k")
    assert item["Value"] == b"v1"
    assert c.kv.put("k", "v2", cas=item["ModifyIndex"])
    new_index, item = c.kv.get("k", index=kv_index, wait="1s")
    assert int(new_index) > int(kv_index) and item["Value"] == b"v2"
    assert c.catalog.datacenters() == ["dc1", "dc2"]
    assert c.agent.self()["Config"]["Datacenter"] == "dc1"
    assert c.agent.service.deregister("web-1")
    return "ok"
