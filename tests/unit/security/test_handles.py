"""Signed, prompt-bound KV handles: what passes and what each refusal says."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from kvmesh.api.v1 import common_pb2
from kvmesh.discovery.client import ServiceInstance
from kvmesh.errors import AuthorizationError
from kvmesh.kv.hashing import root_hash
from kvmesh.security.handles import META_KEY, HandleSigner, verify
from kvmesh.worker.convert import timestamp
from kvmesh.worker.handle_keys import HandleKeys

ROOT = root_hash("model-a")
PROMPT = list(range(100, 137))  # 37 tokens: two full blocks of 16 and a partial one


def issued(signer: HandleSigner, prompt: list[int] = PROMPT, ttl_s: float = 30.0) -> Any:
    handle = common_pb2.KvHandle(
        request_id="r1",
        worker_id="prefill-1",
        grpc_address="127.0.0.1:5000",
        block_ids=[7, 8, 9],
        num_tokens=len(prompt),
        block_size=16,
        layout_fingerprint="L",
        lease_expiry=timestamp(ttl_s),
    )
    signer.bind(handle, prompt, 16, ROOT)
    return handle


def test_a_genuine_handle_for_its_prompt_passes() -> None:
    signer = HandleSigner()
    handle = issued(signer)
    assert len(handle.block_hashes) == 2 and len(handle.prompt_digest) == 32
    verify(handle, signer.public_key, PROMPT, ROOT)


@pytest.mark.parametrize(
    "alter",
    [
        lambda h: h.block_ids.__setitem__(0, 1),  # someone else's blocks
        lambda h: setattr(h, "grpc_address", "10.0.0.9:5000"),
        lambda h: setattr(h, "request_id", "r2"),
        lambda h: h.block_hashes.__setitem__(0, 12345),
        lambda h: setattr(h, "layout_fingerprint", "M"),
        lambda h: h.lease_expiry.FromSeconds(int(time.time()) + 3600),  # a longer lease
    ],
)
def test_an_altered_handle_is_refused(alter: Any) -> None:
    signer = HandleSigner()
    handle = issued(signer)
    alter(handle)
    with pytest.raises(AuthorizationError, match="forged or altered"):
        verify(handle, signer.public_key, PROMPT, ROOT)


def test_a_handle_signed_by_another_key_is_refused() -> None:
    with pytest.raises(AuthorizationError, match="forged or altered"):
        verify(issued(HandleSigner()), HandleSigner().public_key, PROMPT, ROOT)
    with pytest.raises(AuthorizationError, match="forged or altered"):
        verify(issued(HandleSigner()), "not base64 at all!", PROMPT, ROOT)


def test_an_expired_handle_is_refused() -> None:
    signer = HandleSigner()
    handle = issued(signer, ttl_s=1.0)
    with pytest.raises(AuthorizationError, match="expired"):
        verify(handle, signer.public_key, PROMPT, ROOT, now=time.time() + 2)


@pytest.mark.parametrize(
    "other",
    [
        [*PROMPT[:-1], 999],  # the same full blocks, another tail
        [1, *PROMPT[1:]],  # another first block
        PROMPT[:-1],  # shorter
        [*PROMPT, 5],  # longer
    ],
)
def test_a_genuine_handle_presented_with_another_prompt_is_refused(other: list[int]) -> None:
    signer = HandleSigner()
    with pytest.raises(AuthorizationError, match="issued for another prompt"):
        verify(issued(signer), signer.public_key, other, ROOT)


def test_a_handle_for_another_models_hashes_is_refused() -> None:
    signer = HandleSigner()
    with pytest.raises(AuthorizationError, match="another prompt"):
        verify(issued(signer), signer.public_key, PROMPT, root_hash("model-b"))


@dataclass
class FakeDiscovery:
    instances: list[ServiceInstance] = field(default_factory=list)
    queries: int = 0

    async def healthy(self, service: str) -> tuple[int, list[ServiceInstance]]:
        assert service == "kvmesh-prefill"
        self.queries += 1
        return 1, list(self.instances)

    async def close(self) -> None:
        pass


def prefill(worker_id: str, key: str) -> ServiceInstance:
    return ServiceInstance(
        "id-" + worker_id,
        "kvmesh-prefill",
        "127.0.0.1",
        1,
        meta={"worker_id": worker_id, META_KEY: key},
    )


async def test_keys_come_from_discovery_and_a_restarted_worker_is_refetched() -> None:
    first, second = HandleSigner(), HandleSigner()
    discovery = FakeDiscovery([prefill("prefill-1", first.public_key)])
    keys = HandleKeys(discovery, refresh_s=0.0)  # type: ignore[arg-type]
    assert await keys.check(issued(first), PROMPT, ROOT)
    assert discovery.queries == 1
    assert await keys.check(issued(first), PROMPT, ROOT)
    assert discovery.queries == 1  # cached
    discovery.instances = [prefill("prefill-1", second.public_key)]  # restarted, new key
    assert await keys.check(issued(second), PROMPT, ROOT)
    with pytest.raises(AuthorizationError, match="forged or altered"):
        await keys.check(issued(HandleSigner()), PROMPT, ROOT)


async def test_a_handle_from_a_worker_not_in_discovery_is_not_used() -> None:
    keys = HandleKeys(FakeDiscovery(), refresh_s=0.0)  # type: ignore[arg-type]
    assert not await keys.check(issued(HandleSigner()), PROMPT, ROOT)
