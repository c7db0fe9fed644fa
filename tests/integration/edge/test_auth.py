"""The edge's API keys, per-key rate limits and HTTPS, served by uvicorn on 127.0.0.1 in front
of a fake router."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI, AuthenticationError, RateLimitError

from kvmesh.rpc import RpcServer, open_channel
from kvmesh.security import certs
from kvmesh.security.roles import Role
from services.edge import EdgeConfig, RunningEdge, serve_in_background
from tests.integration.edge.fake_router import FakeRouter

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("edge-auth")
    (directory / "keys.txt").write_text(
        "# key tenant [limits]\n"
        "sk-alpha-0001 tenant-a\n"
        "sk-beta-0002 tenant-b rps=2\n"
        "sk-gamma-0003 tenant-c tpm=30   # a small token budget\n"
    )
    certs.init(directory / "tls", roles=[Role.EDGE])
    return directory


@pytest.fixture(scope="module")
async def edge(router: tuple[FakeRouter, RpcServer], files: Path) -> AsyncIterator[RunningEdge]:
    channel = open_channel(router[1].address)
    config = EdgeConfig(
        port=0,
        shutdown_grace_s=1,
        api_key_file=files / "keys.txt",
        tls_cert=files / "tls" / "edge.pem",
        tls_key=files / "tls" / "edge-key.pem",
    )
    async with await serve_in_background(config, channel) as running:
        yield running
    await channel.close()


@pytest.fixture
def https(edge: RunningEdge, files: Path) -> httpx.AsyncClient:
    context = ssl.create_default_context(cafile=str(files / "tls" / "ca.pem"))
    return httpx.AsyncClient(base_url=edge.url, verify=context, timeout=10)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_the_edge_serves_https_only(edge: RunningEdge) -> None:
    assert edge.url.startswith("https://")
    async with httpx.AsyncClient(base_url=edge.url.replace("https", "http"), timeout=5) as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get("/health")


async def test_no_key_and_a_wrong_key_get_401_in_openais_shape(
    https: httpx.AsyncClient, fake: FakeRouter
) -> None:
    async with https:
        missing = await https.post("/v1/chat/completions", json=CHAT)
        wrong = await https.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-nope-9999"))
        models = await https.get("/v1/models")
        health = await https.get("/health")
    assert missing.status_code == 401 and wrong.status_code == 401 and models.status_code == 401
    assert "You didn't provide an API key" in missing.json()["error"]["message"]
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert "sk-nope-9999" not in wrong.text  # the key is redacted in the answer
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert health.status_code != 401  # probes stay open
    assert fake.requests == []  # nothing reached the router


async def test_a_keys_tenant_reaches_the_router(https: httpx.AsyncClient, fake: FakeRouter) -> None:
    async with https:
        response = await https.post(
            "/v1/chat/completions", json=CHAT, headers=bearer("sk-alpha-0001")
        )
    assert response.status_code == 200, response.text
    assert fake.requests[-1].tenant == "tenant-a"


async def test_past_a_keys_request_rate_the_answer_is_429_with_retry_after(
    https: httpx.AsyncClient, fake: FakeRouter
) -> None:
    async with https:
        codes = [
            (await https.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-beta-0002")))
            for _ in range(5)
        ]
    statuses = [r.status_code for r in codes]
    assert statuses[:2] == [200, 200] and 429 in statuses
    limited = next(r for r in codes if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert "requests per second" in limited.json()["error"]["message"]


async def test_past_a_keys_token_budget_the_answer_is_429(
    https: httpx.AsyncClient, fake: FakeRouter
) -> None:
    async with https:
        first = await https.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-gamma-0003"))
        assert first.status_code == 200
        used = first.json()["usage"]["total_tokens"]
        statuses = []
        for _ in range(40 // max(used, 1) + 2):
            r = await https.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-gamma-0003"))
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert "tokens per minute" in r.json()["error"]["message"]
                break
    assert statuses[-1] == 429


async def test_the_openai_client_with_the_ca_and_a_key(edge: RunningEdge, files: Path) -> None:
    context = ssl.create_default_context(cafile=str(files / "tls" / "ca.pem"))
    http_client = httpx.AsyncClient(verify=context)
    client = AsyncOpenAI(
        base_url=f"{edge.url}/v1", api_key="sk-alpha-0001", http_client=http_client, max_retries=0
    )
    answer = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert answer.choices[0].message.content
    bad = AsyncOpenAI(
        base_url=f"{edge.url}/v1", api_key="sk-wrong", http_client=http_client, max_retries=0
    )
    with pytest.raises(AuthenticationError):
        await bad.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    await http_client.aclose()
    assert RateLimitError  # the client maps 429 to it (see the rate tests above)


async def test_a_body_that_does_not_arrive_in_time_is_a_408(
    router: tuple[FakeRouter, RpcServer],
) -> None:
    channel = open_channel(router[1].address)
    config = EdgeConfig(port=0, shutdown_grace_s=1, body_timeout_s=0.5)
    async with await serve_in_background(config, channel) as edge:
        reader, writer = await asyncio.open_connection(edge.host, edge.port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model"'
        )
        await writer.drain()  # and never the rest
        status_line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
    await channel.close()
    assert b" 408 " in status_line


async def test_headers_that_do_not_arrive_in_time_are_a_408_and_the_connection_closes(
    router: tuple[FakeRouter, RpcServer],
) -> None:
    channel = open_channel(router[1].address)
    config = EdgeConfig(port=0, shutdown_grace_s=1, header_timeout_s=0.5)
    async with await serve_in_background(config, channel) as edge:
        # A kept-alive connection: the first request is served, the second trickles in.
        reader, writer = await asyncio.open_connection(edge.host, edge.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        assert b" 200 " in await asyncio.wait_for(reader.readline(), 10)
        await asyncio.wait_for(reader.readuntil(b'"ok"}'), 10)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never the end
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        rest = await asyncio.wait_for(reader.read(), 10)  # b"" once the edge closes
        writer.close()
        # A connection that sends nothing at all is closed the same way.
        idle_reader, idle_writer = await asyncio.open_connection(edge.host, edge.port)
        idle_status = await asyncio.wait_for(idle_reader.readline(), 10)
        idle_writer.close()
    await channel.close()
    assert b" 408 " in status_line and b"request_timeout" in rest
    assert b" 408 " in idle_status
