"""Tenant isolation of the prefix cache through the edge: a request hits only blocks cached by
requests with the same `cache_salt` (vLLM's field), so `cached_tokens` reveals nothing across
tenants. Real processes on 127.0.0.1, the disaggregated path (prefill hits count)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from kvmesh.up import Mesh
from tests.e2e.mesh import running_mesh

# A prompt long enough for several full blocks of 16 after the chat template.
PROMPT = "List the planets of the solar system in order from the sun, with one fact about each."


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with running_mesh(Path(tmp_path_factory.mktemp("tenants"))) as running:
        yield running


async def cached_tokens(mesh: Mesh, salt: str | None) -> int:
    body: dict[str, object] = {
        "model": mesh.model_id,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 2,
        "temperature": 0,
    }
    if salt is not None:
        body["cache_salt"] = salt
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=120) as http:
        response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] > 48
    return int(usage["prompt_tokens_details"]["cached_tokens"])


async def test_one_tenants_cache_is_not_anothers(mesh: Mesh) -> None:
    assert await cached_tokens(mesh, "tenant-a") == 0
    assert await cached_tokens(mesh, "tenant-a") > 0  # A's own blocks
    assert await cached_tokens(mesh, "tenant-b") == 0  # the same prompt, another tenant
    assert await cached_tokens(mesh, None) == 0  # nor unsalted requests
    assert await cached_tokens(mesh, "tenant-b") > 0


async def test_a_bad_cache_salt_is_a_400(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=30) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={
                "model": mesh.model_id,
                "messages": [{"role": "user", "content": "hi"}],
                "cache_salt": "",
            },
        )
    assert response.status_code == 400
    assert "cache_salt" in response.text
