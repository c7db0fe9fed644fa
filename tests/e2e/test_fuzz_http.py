"""Fuzzing the edge's HTTP API with schemathesis, from the OpenAPI document it serves, bounded.

A mesh of sim workers (real processes on 127.0.0.1) behind the edge. For every operation of
`/openapi.json`, schemathesis generates requests that fit the document (positive) and requests
that break it (negative), derandomized so that every run sends the same ones. The checks: never
a 5xx; every status, content type and JSON body is one the document declares; requests that
break the document are refused (4xx). Afterwards every service still serves and no KV block or
lease is left.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from kvmesh.up import Mesh
from tests.e2e.mesh import sim_mesh, still_serving_and_whole

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,  # the same requests on every run: CI stays reproducible and bounded
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with sim_mesh(
        tmp_path_factory.mktemp("fuzz-http") / "logs",
        speed=50,
        worker_args=["--engine-arg", "num_blocks=512", "--lease-s", "2"],
        disagg_min_tokens=0,
    ) as running:
        yield running


async def test_the_edge_serves_its_openapi_document(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.edge_url) as http:
        document = (await http.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/models/{model}",
        "/health",
        "/metrics",
        "/openapi.json",
    }
    chat = document["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False  # unknown fields are refused, as documented
    assert chat["properties"]["temperature"]["anyOf"][0] == {
        "type": "number",
        "minimum": 0.0,
        "maximum": 2.0,
    }


async def test_schemathesis_finds_no_server_error_and_no_departure_from_the_document(
    mesh: Mesh,
) -> None:
    schema = await asyncio.to_thread(schemathesis.openapi.from_url, f"{mesh.edge_url}/openapi.json")
    statuses: Counter[int] = Counter()

    def fuzz() -> None:
        for result in schema.get_all_operations():
            operation = result.ok()
            strategy = operation.as_strategy(
                generation_mode=GenerationMode.POSITIVE
            ) | operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)

            @SETTINGS
            @given(strategy, st.integers(0, 3))
            def check(case: schemathesis.Case, pick: int) -> None:
                if pick and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                    case.body["model"] = mesh.model_id  # mostly the served model: deeper requests
                response = case.call_and_validate(checks=CHECKS, timeout=60)
                statuses[response.status_code] += 1

            check()

    await asyncio.to_thread(fuzz)
    assert statuses[200] > 0 and statuses[400] > 0, statuses  # deep and shallow requests
    await still_serving_and_whole(mesh)
