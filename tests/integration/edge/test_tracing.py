"""Trace context across the HTTP edge and a gRPC server, with the SDK's in-memory exporter: a
client's `traceparent` makes the edge's SERVER span its child, the edge passes the context in
gRPC metadata, and the router's SERVER span is the edge span's child, with the OpenTelemetry
attributes of HTTP and gRPC spans."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kvmesh.rpc import RpcServer, open_channel
from services.edge import EdgeConfig, RunningEdge, serve_in_background
from tests.integration.edge.fake_router import MODEL, FakeRouter

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "kvmesh-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # this process's, once
    return exporter


@pytest.fixture
async def edge(
    router: tuple[FakeRouter, RpcServer], spans: InMemorySpanExporter
) -> AsyncIterator[RunningEdge]:
    channel = open_channel(router[1].address)
    async with await serve_in_background(EdgeConfig(port=0, shutdown_grace_s=0), channel) as e:
        yield e
    await channel.close()


async def test_one_trace_from_the_http_client_through_the_edge_to_the_router(
    edge: RunningEdge, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with httpx.AsyncClient(base_url=edge.url) as http:
        response = await http.post(
            "/v1/chat/completions",
            json=body,
            headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"},
        )
    assert response.status_code == 200
    traced = {
        s.name: s for s in spans.get_finished_spans() if f"{s.context.trace_id:032x}" == TRACE_ID
    }
    http_span = traced["POST /v1/chat/completions"]
    grpc_span = traced["kvmesh.v1.Generation/Generate"]
    assert http_span.kind is trace.SpanKind.SERVER and grpc_span.kind is trace.SpanKind.SERVER
    assert http_span.parent is not None and f"{http_span.parent.span_id:016x}" == CLIENT_SPAN
    assert grpc_span.parent is not None and grpc_span.parent.span_id == http_span.context.span_id
    assert http_span.attributes is not None and grpc_span.attributes is not None
    assert http_span.attributes["http.response.status_code"] == 200
    assert http_span.attributes["http.route"] == "/v1/chat/completions"
    assert grpc_span.attributes["rpc.system"] == "grpc"
    assert grpc_span.attributes["rpc.grpc.status_code"] == 0
    assert grpc_span.attributes["kvmesh.request_id"] == response.headers["x-request-id"]
