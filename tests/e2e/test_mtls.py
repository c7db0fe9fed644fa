"""The mesh under `kvmesh up --secure`, as real processes on 127.0.0.1.

Every service gets its role's certificate (mutual TLS), the registry needs its ACL token to
write, the edge serves HTTPS and needs an API key. The disaggregated path (router -> prefill,
router -> decode, decode -> prefill's KV metadata and lease) works and gives one engine's
greedy text, through the official openai client too; the attacks fail with the documented
refusal, and the mesh serves on.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
import httpx
import pytest
from openai import AsyncOpenAI

from kvmesh.api.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from kvmesh.engine import EngineConfig
from kvmesh.engine.torch_engine import TorchCore
from kvmesh.rpc import open_channel
from kvmesh.sampling import SamplingParams
from kvmesh.security.roles import Role
from kvmesh.security.tls import TlsIdentity
from kvmesh.up import Child, Mesh
from tests.e2e.mesh import metric
from tests.helpers import generate

QUESTION = "Say hello to the mesh in one short sentence."
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def mesh(secure_mesh: Mesh) -> Mesh:
    return secure_mesh


def tls_dir(mesh: Mesh) -> Path:
    assert mesh.config.tls_dir is not None
    return mesh.config.tls_dir


def channel_as(mesh: Mesh, role: Role | None, address: str) -> grpc.aio.Channel:
    identity = TlsIdentity.load(tls_dir(mesh), role) if role else None
    if identity is None:
        return grpc.aio.insecure_channel(address)
    return open_channel(address, wait_for_ready=False, identity=identity)


def only(mesh: Mesh, tier: str) -> Child:
    (child,) = mesh.workers(tier)
    return child


async def ask(mesh: Mesh, role: Role) -> generation_pb2.GenerateResponse:
    request = generation_pb2.GenerateRequest(
        chat=generation_pb2.ChatMessages(
            messages=[generation_pb2.ChatMessage(role="user", content=QUESTION)]
        ),
        sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
        return_token_ids=True,
    )
    whole = generation_pb2.GenerateResponse()
    async with channel_as(mesh, role, mesh.router_address) as channel:
        async for response in generation_pb2_grpc.GenerationStub(channel).Generate(
            request, timeout=120
        ):
            whole.token_ids.extend(response.token_ids)
            whole.text += response.text
    return whole


@pytest.fixture(scope="module")
def expected() -> list[int]:
    reference = TorchCore(EngineConfig(model="smollm2", device="cpu"), show_progress=False)
    assert reference.tokenizer is not None
    prompt = reference.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    return generate(reference, [prompt], greedy)[0]


async def test_the_disaggregated_path_runs_over_mutual_tls(mesh: Mesh, expected: list[int]) -> None:
    decode = only(mesh, "decode")
    moved_before = await metric(decode, "kvmesh_kv_transfer_bytes_total")
    answer = await ask(mesh, Role.ADMIN)
    assert list(answer.token_ids) == expected
    assert await metric(decode, "kvmesh_kv_transfer_bytes_total") > moved_before  # NIXL read
    # The official client, over HTTPS with the mesh's CA and an API key: the same greedy text.
    assert mesh.bundle is not None and mesh.edge_url.startswith("https://")
    async with httpx.AsyncClient(verify=mesh.edge_ssl()) as http:
        client = AsyncOpenAI(
            base_url=f"{mesh.edge_url}/v1",
            api_key=mesh.bundle.api_key,
            http_client=http,
            max_retries=0,
        )
        completion = await client.chat.completions.create(
            model=mesh.model_id,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
    assert completion.choices[0].message.content == answer.text


async def test_an_edge_call_without_a_key_gets_401(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.edge_url, verify=mesh.edge_ssl()) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": mesh.model_id, "messages": [{"role": "user", "content": "hi"}]},
        )
    assert response.status_code == 401
    assert "You didn't provide an API key" in response.json()["error"]["message"]


async def test_a_registry_write_without_the_token_gets_403(mesh: Mesh) -> None:
    directory = tls_dir(mesh)
    assert mesh.registry_address.startswith("https://")  # the registry serves HTTPS
    admin = ssl.create_default_context(cafile=str(directory / "ca.pem"))
    admin.load_cert_chain(directory / "admin.pem", directory / "admin-key.pem")
    async with httpx.AsyncClient(base_url=mesh.registry_address, verify=admin) as http:
        response = await http.put("/v1/kv/kvmesh/controlplane/cordon/dc1", content=b"1")
        services = await http.get("/v1/catalog/services")  # reads stay open
    assert (response.status_code, response.text) == (403, "Permission denied")
    assert "kvmesh-decode" in services.json()
    # Without a client certificate of the mesh's CA the handshake fails (verify_incoming).
    async with httpx.AsyncClient(base_url=mesh.registry_address, verify=mesh.edge_ssl()) as http:
        with pytest.raises(httpx.TransportError):
            await http.get("/v1/catalog/services")


async def test_a_plaintext_call_to_a_worker_fails_its_handshake(mesh: Mesh) -> None:
    async with channel_as(mesh, None, only(mesh, "decode").address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await worker_pb2_grpc.WorkerStub(channel).GetInfo(
                worker_pb2.GetInfoRequest(), timeout=10
            )
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_an_edge_certificate_cannot_call_decode(mesh: Mesh) -> None:
    request = worker_pb2.DecodeRequest(request_id="intruder")
    async with channel_as(mesh, Role.EDGE, only(mesh, "decode").address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in worker_pb2_grpc.DecodeStub(channel).Decode(request, timeout=10):
                pass
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "needs the router role" in (caught.value.details() or "")


async def test_only_decode_workers_get_a_prefill_workers_kv_metadata(mesh: Mesh) -> None:
    async with channel_as(mesh, Role.ROUTER, only(mesh, "prefill").address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await worker_pb2_grpc.KvTransferStub(channel).GetAgentMetadata(
                worker_pb2.GetAgentMetadataRequest(), timeout=10
            )
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "needs the decode role" in (caught.value.details() or "")


async def test_drain_without_the_admin_identity_is_refused_and_the_mesh_serves_on(
    mesh: Mesh, expected: list[int]
) -> None:
    async with channel_as(mesh, Role.ROUTER, only(mesh, "decode").address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await worker_pb2_grpc.WorkerStub(channel).Drain(
                worker_pb2.DrainRequest(timeout_ms=1), timeout=10
            )
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "needs the admin or controlplane role" in (caught.value.details() or "")
    assert list((await ask(mesh, Role.EDGE)).token_ids) == expected
