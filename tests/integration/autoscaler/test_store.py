"""The policy store against the embedded registry on a free port: get, put, CAS, watch."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from kvmesh.discovery import Discovery
from kvmesh.errors import InvalidRequestError
from services.autoscaler.policy import Policy
from services.autoscaler.store import POLICY_PREFIX, PolicyStore, StoredPolicyError
from tests.integration.discovery_backends import embedded

SLA_DECODE = Policy(
    model="org/SmolLM2-135M",
    tier="decode",
    min_replicas=0,
    max_replicas=6,
    mode="sla",
    target_itl_s=0.04,
    window_s=20.0,
    max_step=1,
)


@pytest.fixture
async def discovery() -> AsyncIterator[Discovery]:
    async with embedded() as registry, Discovery(registry.address()) as client:
        yield client


@pytest.fixture
def store(discovery: Discovery) -> PolicyStore:
    return PolicyStore(discovery)


async def _next(watch: AsyncGenerator[Policy, None]) -> Policy:
    return await asyncio.wait_for(anext(watch), 5.0)


async def test_an_absent_policy_is_the_default(store: PolicyStore) -> None:
    assert await store.get("m", "prefill") == Policy(model="m", tier="prefill")
    assert await store.policies() == []


async def test_put_then_get_at_the_documented_key(store: PolicyStore, discovery: Discovery) -> None:
    assert await store.put(SLA_DECODE)
    assert await store.get("org/SmolLM2-135M", "decode") == SLA_DECODE
    _, entry = await discovery.kv_get(f"{POLICY_PREFIX}org/SmolLM2-135M/decode")
    assert entry is not None
    assert Policy.from_json(entry.value) == SLA_DECODE
    assert await store.policies() == [SLA_DECODE]
    assert await store.delete("org/SmolLM2-135M", "decode")
    assert await store.get("org/SmolLM2-135M", "decode") == Policy(
        model="org/SmolLM2-135M", tier="decode"
    )


async def test_an_invalid_policy_is_refused_before_anything_is_written(
    store: PolicyStore, discovery: Discovery
) -> None:
    bad = Policy(model="m", tier="decode", min_replicas=5, max_replicas=3)
    with pytest.raises(InvalidRequestError, match="min_replicas"):
        await store.put(bad)
    _, entries = await discovery.kv_list(POLICY_PREFIX)
    assert entries == []
    with pytest.raises(InvalidRequestError, match="tier must be prefill or decode"):
        await store.get("m", "aggregated")


async def test_compare_and_set(store: PolicyStore, discovery: Discovery) -> None:
    policy = Policy(model="m", tier="prefill")
    assert await store.put(policy, cas=0)
    assert not await store.put(dataclasses.replace(policy, max_replicas=2), cas=0)
    _, entry = await discovery.kv_get(store.key("m", "prefill"))
    assert entry is not None
    assert await store.put(dataclasses.replace(policy, max_replicas=3), cas=entry.modify_index)
    assert (await store.get("m", "prefill")).max_replicas == 3


async def test_a_bad_stored_value_is_reported_with_its_key(
    store: PolicyStore, discovery: Discovery
) -> None:
    key = store.key("m", "decode")
    await discovery.kv_put(key, b'{"model": "m", "tier": "decode", "max_step": 0}')
    with pytest.raises(StoredPolicyError, match=f"^{key}: max_step must be >= 1"):
        await store.get("m", "decode")
    await discovery.kv_put(key, Policy(model="other", tier="decode").to_json())
    with pytest.raises(StoredPolicyError, match="holds the policy of other/decode"):
        await store.get("m", "decode")
    assert await store.policies() == []


async def test_watch_yields_stored_policies_then_each_change(
    store: PolicyStore, discovery: Discovery
) -> None:
    first = Policy(model="a", tier="prefill", max_replicas=3)
    await store.put(first)
    watch = store.watch(wait_s=5.0)
    try:
        assert await _next(watch) == first  # what is stored now

        await store.put(SLA_DECODE)  # another key: only it is yielded
        assert await _next(watch) == SLA_DECODE

        changed = dataclasses.replace(first, max_replicas=5)
        await store.put(changed)
        assert await _next(watch) == changed

        # A hand-written bad value is skipped; the next good change still arrives.
        await discovery.kv_put(store.key("a", "prefill"), b"{not json")
        await store.put(dataclasses.replace(SLA_DECODE, max_step=2))
        assert await _next(watch) == dataclasses.replace(SLA_DECODE, max_step=2)

        await store.delete("org/SmolLM2-135M", "decode")  # back to the default
        assert await _next(watch) == Policy(model="org/SmolLM2-135M", tier="decode")
    finally:
        await watch.aclose()
