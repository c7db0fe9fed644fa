"""The Autoscaler RPCs on a real gRPC server on loopback, with the admin token, over the embedded
registry in-process: auth, validation naming the field, policy round trip, logged decisions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from kvmesh.api.v1 import autoscaler_pb2, autoscaler_pb2_grpc, common_pb2
from kvmesh.discovery import Discovery
from kvmesh.rpc import (
    RpcServer,
    ServerConfig,
    ServiceBinding,
    TokenAuthenticator,
    bearer,
    open_channel,
)
from services.autoscaler.decide import Observation
from services.autoscaler.loop import AutoscalerLoop, DecisionLog
from services.autoscaler.main import METHOD_PREFIX, SERVICE_NAME
from services.autoscaler.policy import Policy
from services.autoscaler.servicer import AutoscalerServicer
from services.autoscaler.store import PolicyStore
from tests.integration.discovery_backends import embedded

TOKEN = "s3cret"
ADMIN = bearer(TOKEN)


class FixedObserver:
    def __init__(self, ready: int, in_flight: int) -> None:
        self.observation = Observation(ready_replicas=ready, in_flight=in_flight)

    async def observe(self, model: str, tier: str) -> Observation:
        return self.observation


@dataclass
class Service:
    stub: Any  # grpc's stubs type the calls as synchronous; these are grpc.aio calls
    store: PolicyStore
    decisions: DecisionLog
    discovery: Discovery
    address: str = ""


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    async with embedded() as registry, Discovery(registry.address()) as discovery:
        store, decisions = PolicyStore(discovery), DecisionLog()
        servicer = AutoscalerServicer(store, decisions)
        binding = ServiceBinding(
            SERVICE_NAME,
            lambda server: autoscaler_pb2_grpc.add_AutoscalerServicer_to_server(servicer, server),
        )
        server = RpcServer(
            [binding],
            ServerConfig(host="127.0.0.1", port=0),
            authenticator=TokenAuthenticator(TOKEN, [METHOD_PREFIX]),
        )
        await server.start()
        channel = open_channel(server.address)
        try:
            stub = autoscaler_pb2_grpc.AutoscalerStub(channel)
            yield Service(stub, store, decisions, discovery, server.address)
        finally:
            await channel.close()
            await server.stop(0)


def _policy(**fields: object) -> autoscaler_pb2.ScalingPolicy:
    base: dict[str, object] = {
        "model": "org/m",
        "tier": common_pb2.TIER_DECODE,
        "min_replicas": 0,
        "max_replicas": 4,
        "mode": autoscaler_pb2.SCALING_MODE_LOAD,
        "target_utilization": 0.5,
        "window_s": 10.0,
        "scale_down_delay_s": 30.0,
        "max_step": 1,
        "replica_concurrency": 4,
    }
    return autoscaler_pb2.ScalingPolicy(**(base | fields))  # type: ignore[arg-type]


async def test_every_method_needs_the_admin_token(service: Service) -> None:
    calls = [
        lambda md: service.stub.GetPolicy(
            autoscaler_pb2.GetPolicyRequest(model="m", tier=common_pb2.TIER_DECODE), metadata=md
        ),
        lambda md: service.stub.SetPolicy(
            autoscaler_pb2.SetPolicyRequest(policy=_policy()), metadata=md
        ),
        lambda md: service.stub.ListDecisions(autoscaler_pb2.ListDecisionsRequest(), metadata=md),
    ]
    for call in calls:
        for metadata in [(), bearer("wrong")]:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await call(metadata)
            assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await service.store.policies() == []  # the refused SetPolicy stored nothing


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"min_replicas": 5, "max_replicas": 2}, "min_replicas"),
        ({"window_s": -1.0}, "window_s"),
        ({"scale_down_delay_s": -1.0}, "scale_down_delay_s"),
        ({"tier": common_pb2.TIER_UNSPECIFIED}, "tier"),
        ({"model": ""}, "model"),
        ({"mode": autoscaler_pb2.SCALING_MODE_SLA}, "target_itl_s"),
    ],
)
async def test_set_policy_refuses_bad_fields_by_name(
    service: Service, fields: dict[str, object], named: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await service.stub.SetPolicy(
            autoscaler_pb2.SetPolicyRequest(policy=_policy(**fields)), metadata=ADMIN
        )
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (failure.value.details() or "")
    assert await service.store.policies() == []


async def test_get_policy_refuses_an_empty_model_or_unscaled_tier(service: Service) -> None:
    for model, tier, named in [
        ("", common_pb2.TIER_DECODE, "model"),
        ("m", common_pb2.TIER_UNSPECIFIED, "tier"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await service.stub.GetPolicy(
                autoscaler_pb2.GetPolicyRequest(model=model, tier=tier), metadata=ADMIN
            )
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert named in (failure.value.details() or "")


async def test_set_then_get_round_trips_and_absent_is_the_default(service: Service) -> None:
    request = autoscaler_pb2.GetPolicyRequest(model="org/m", tier=common_pb2.TIER_DECODE)
    default = await service.stub.GetPolicy(request, metadata=ADMIN)
    assert default == Policy(model="org/m", tier="decode").to_proto()
    stored = await service.stub.SetPolicy(
        autoscaler_pb2.SetPolicyRequest(policy=_policy()), metadata=ADMIN
    )
    assert stored == _policy()
    assert await service.stub.GetPolicy(request, metadata=ADMIN) == _policy()
    assert await service.store.get("org/m", "decode") == Policy.from_proto(_policy())


async def test_list_decisions_returns_what_the_loop_logged(service: Service) -> None:
    await service.stub.SetPolicy(autoscaler_pb2.SetPolicyRequest(policy=_policy()), metadata=ADMIN)
    await service.store.put(Policy(model="other", tier="prefill"))
    now = [100.0]
    loop = AutoscalerLoop(
        service.store,
        FixedObserver(ready=1, in_flight=6),  # 6 / (4 x 0.5) needs 3: +1 (max step 1)
        service.decisions,
        service.discovery,
        clock=lambda: now[0],
    )
    await loop.tick()
    now[0] = 105.0
    await loop.tick()
    listed = await service.stub.ListDecisions(
        autoscaler_pb2.ListDecisionsRequest(model="org/m"), metadata=ADMIN
    )
    assert [d.time.seconds for d in listed.decisions] == [105, 100]  # newest first
    first = listed.decisions[0]
    assert (first.model, first.tier) == ("org/m", common_pb2.TIER_DECODE)
    assert (first.current_replicas, first.desired_replicas) == (1, 2)
    assert "max step 1" in first.reason and first.inputs["load"] == 6
    everything = await service.stub.ListDecisions(
        autoscaler_pb2.ListDecisionsRequest(limit=3), metadata=ADMIN
    )
    assert len(everything.decisions) == 3
    _, published = await service.discovery.kv_get("kvmesh/autoscaler/desired/org/m/decode")
    assert published is not None and b'"desired": 2' in published.value
