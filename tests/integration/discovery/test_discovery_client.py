"""The discovery client's suite, against the embedded registry and (when installed) Consul."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from kvmesh.discovery import Discovery, Registrar, Registration, ServiceInstance
from kvmesh.rpc import RpcServer
from tests.integration.discovery_backends import CONSUL, NO_CONSUL, consul_agent, embedded
from tests.integration.rpc.sample_service import SampleWorker, binding

BACKENDS = [
    "embedded",
    pytest.param("consul", marks=pytest.mark.skipif(CONSUL is None, reason=NO_CONSUL)),
]


@pytest.fixture(params=BACKENDS)
async def discovery(request: pytest.FixtureRequest) -> AsyncIterator[Discovery]:
    if request.param == "embedded":
        async with embedded() as registry, Discovery(registry.address()) as client:
            yield client
    else:
        async with consul_agent() as address, Discovery(address) as client:
            yield client


def _registration(name: str, port: int = 9000, **kwargs: object) -> Registration:
    return Registration(
        name=name,
        service_id=f"{name}-{uuid.uuid4().hex[:8]}",
        address="127.0.0.1",
        port=port,
        tags=("model=smollm2", "role=decode"),
        meta={"block_size": "16"},
        **kwargs,  # type: ignore[arg-type]
    )


async def _next_change(
    watch: AsyncIterator[list[ServiceInstance]], timeout_s: float = 5.0
) -> list[ServiceInstance]:
    return await asyncio.wait_for(anext(watch), timeout_s)


async def test_ttl_registration_is_healthy_only_while_passing(discovery: Discovery) -> None:
    reg = _registration("kvmesh-decode", ttl_s=30.0)
    await discovery.register(reg)
    _, healthy = await discovery.healthy(reg.name)
    assert healthy == []  # a TTL check starts critical
    await discovery.pass_ttl(reg.check_id)
    _, healthy = await discovery.healthy(reg.name)
    assert [(i.service_id, i.port, i.meta["block_size"]) for i in healthy] == [
        (reg.service_id, 9000, "16")
    ]
    assert set(healthy[0].tags) == {"model=smollm2", "role=decode"}
    _, tagged = await discovery.healthy(reg.name, tag="role=prefill")
    assert tagged == []
    await discovery.deregister(reg.service_id)
    _, healthy = await discovery.healthy(reg.name)
    assert healthy == []


async def test_blocking_query_returns_on_change(discovery: Discovery) -> None:
    reg = _registration("kvmesh-prefill", ttl_s=30.0)
    index, _ = await discovery.healthy(reg.name)
    waiting = asyncio.ensure_future(discovery.healthy(reg.name, index=index, wait_s=20))
    await discovery.register(reg)
    await discovery.pass_ttl(reg.check_id)
    new_index, healthy = await asyncio.wait_for(waiting, 10)
    assert new_index > index
    # The first change may be the registration (still critical); the watch settles on passing.
    if not healthy:
        new_index, healthy = await discovery.healthy(reg.name)
    assert [i.service_id for i in healthy] == [reg.service_id]


async def test_blocking_query_times_out_with_the_same_index(discovery: Discovery) -> None:
    index, _ = await discovery.healthy("kvmesh-nothing")
    again, healthy = await discovery.healthy("kvmesh-nothing", index=index, wait_s=0.5)
    assert again == index
    assert healthy == []


async def test_watch_follows_instances_coming_and_going(discovery: Discovery) -> None:
    watch = discovery.watch("kvmesh-router", wait_s=5)
    assert await _next_change(watch) == []
    reg = _registration("kvmesh-router", ttl_s=30.0)
    registrar = Registrar(discovery, reg)
    await registrar.start()
    seen = await _next_change(watch)
    assert [i.service_id for i in seen] == [reg.service_id]
    await registrar.stop()
    assert await _next_change(watch) == []
    await watch.aclose()  # type: ignore[attr-defined]


async def test_a_silent_ttl_check_goes_critical(discovery: Discovery) -> None:
    reg = _registration("kvmesh-silent", ttl_s=1.0)
    watch = discovery.watch(reg.name, wait_s=5)
    assert await _next_change(watch) == []
    await discovery.register(reg)
    await discovery.pass_ttl(reg.check_id)  # once, then never again
    assert len(await _next_change(watch)) == 1
    assert await _next_change(watch, timeout_s=10) == []
    await watch.aclose()  # type: ignore[attr-defined]
    await discovery.deregister(reg.service_id)


async def test_grpc_check_follows_the_health_service(discovery: Discovery) -> None:
    server = RpcServer([binding(SampleWorker("g"))])
    port = await server.start()
    try:
        reg = _registration("kvmesh-grpc", port=port, ttl_s=None, grpc_check_interval_s=0.5)
        watch = discovery.watch(reg.name, wait_s=5)
        assert await _next_change(watch) == []
        await discovery.register(reg)  # NOT_SERVING: stays out
        await server.set_serving(True)
        assert [i.port for i in await _next_change(watch, timeout_s=10)] == [port]
        await server.set_serving(False)
        assert await _next_change(watch, timeout_s=10) == []
        await watch.aclose()  # type: ignore[attr-defined]
        await discovery.deregister(reg.service_id)
    finally:
        await server.stop(0)


async def test_kv_put_get_cas_delete_and_watch(discovery: Discovery) -> None:
    key = f"kvmesh/test/{uuid.uuid4().hex}"
    _, missing = await discovery.kv_get(key)
    assert missing is None
    assert await discovery.kv_put(key, b"v1", cas=0)  # create only
    assert not await discovery.kv_put(key, b"again", cas=0)
    _, entry = await discovery.kv_get(key)
    assert entry is not None and entry.value == b"v1"
    assert not await discovery.kv_put(key, b"stale", cas=entry.modify_index + 1000)
    assert await discovery.kv_put(key, b"v2", cas=entry.modify_index)
    watch = discovery.kv_watch(key.rsplit("/", 1)[0], wait_s=5)
    first = await asyncio.wait_for(anext(watch), 5)
    assert [e.value for e in first] == [b"v2"]
    await discovery.kv_put(key, "v3")
    second = await asyncio.wait_for(anext(watch), 5)
    assert [e.value for e in second] == [b"v3"]
    assert await discovery.kv_delete(key)
    assert (await discovery.kv_get(key))[1] is None
    await watch.aclose()  # type: ignore[attr-defined]


async def test_several_datacenters_in_one_registry() -> None:
    async with embedded(("us-east", "eu-west")) as registry:
        east = Discovery(registry.address("us-east"))
        west = Discovery(registry.address("eu-west"))
        try:
            assert sorted(await east.datacenters()) == ["eu-west", "us-east"]
            assert await west.local_datacenter() == "eu-west"
            reg = _registration("kvmesh-decode", ttl_s=30.0)
            await west.register(reg)
            await west.pass_ttl(reg.check_id)
            _, here = await east.healthy(reg.name)
            _, there = await east.healthy(reg.name, datacenter="eu-west")
            assert here == []
            assert [(i.service_id, i.datacenter) for i in there] == [(reg.service_id, "eu-west")]
            assert await east.kv_put("kvmesh/policy", b"east", datacenter="eu-west")
            assert (await west.kv_get("kvmesh/policy"))[1] is not None
            assert (await east.kv_get("kvmesh/policy"))[1] is None
        finally:
            await east.close()
            await west.close()
