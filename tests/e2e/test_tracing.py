"""One trace of one request through the real mesh (edge, router, prefill and decode workers,
each its own process on 127.0.0.1): every process exports its spans over OTLP to
`OTEL_EXPORTER_OTLP_ENDPOINT`, here a collector in the test. The request's trace holds a span
of all four services, parent to child in that order, and the decode worker's KV transfer as
its own span with the bytes moved and the time it took. Log lines of the request carry its
trace id."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from kvmesh.up import Mesh
from tests.e2e.mesh import running_mesh

TRACE_ID = "5b8efff798038103d269b633813fc60c"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span: (service.name, span)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            )
            for scope_spans in resource_spans.scope_spans:
                self.spans += [(service, span) for span in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
async def collector() -> AsyncIterator[tuple[Collector, str]]:
    server = grpc.aio.server()
    received = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(received, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield received, f"http://127.0.0.1:{port}"
    await server.stop(0)


@pytest.fixture(scope="module")
def otlp_environment(collector: tuple[Collector, str]) -> Iterator[None]:
    """The mesh's processes inherit it: the standard variables, and a short batch delay."""
    variables = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector[1], "OTEL_BSP_SCHEDULE_DELAY": "200"}
    os.environ.update(variables)
    yield
    for name in variables:
        del os.environ[name]


@pytest.fixture(scope="module")
async def mesh(
    tmp_path_factory: pytest.TempPathFactory, otlp_environment: None
) -> AsyncIterator[Mesh]:
    async with running_mesh(Path(tmp_path_factory.mktemp("tracing"))) as running:
        yield running


async def test_one_request_is_one_trace_across_four_services_with_the_transfer(
    mesh: Mesh, collector: tuple[Collector, str]
) -> None:
    received = collector[0]
    body = {
        "model": mesh.model_id,
        "messages": [{"role": "user", "content": "Trace this request through the mesh, please."}],
        "max_tokens": 4,
    }
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=120) as http:
        response = await http.post(
            "/v1/chat/completions",
            json=body,
            headers={"traceparent": f"00-{TRACE_ID}-{'1' * 16}-01"},
        )
    assert response.status_code == 200, response.text
    wanted = {"kvmesh-edge", "kvmesh-router", "kvmesh-prefill", "kvmesh-decode"}
    deadline = time.monotonic() + 30
    while True:
        ours = [(svc, s) for svc, s in received.spans if s.trace_id.hex() == TRACE_ID]
        if wanted <= {svc for svc, _ in ours} and any(s.name == "kv.transfer" for _, s in ours):
            break
        assert time.monotonic() < deadline, sorted({(svc, s.name) for svc, s in ours})
        await asyncio.sleep(0.2)  # the processes export in batches
    by_name = {s.name: (svc, s) for svc, s in ours}
    edge = by_name["POST /v1/chat/completions"][1]
    router = by_name["kvmesh.v1.Generation/Generate"][1]
    prefill = by_name["kvmesh.v1.Prefill/Prefill"][1]
    decode = by_name["kvmesh.v1.Decode/Decode"][1]
    svc, transfer = by_name["kv.transfer"]
    assert router.parent_span_id == edge.span_id
    assert prefill.parent_span_id == router.span_id
    assert decode.parent_span_id == router.span_id
    assert svc == "kvmesh-decode" and transfer.parent_span_id == decode.span_id
    attributes = {a.key: a.value for a in transfer.attributes}
    assert attributes["kvmesh.kv.bytes"].int_value > 0
    assert attributes["kvmesh.kv.seconds"].double_value > 0
    # The decode worker's log lines of the request carry its trace id.
    log = (mesh.config.log_dir / "decode-0.log").read_text()
    assert f'"trace_id": "{TRACE_ID}"' in log
