"""OpenTelemetry traces: one trace per request, across the edge, the router and the workers.

`configure(service)` once per process sets a tracer provider naming the service
(`service.name`: kvmesh-edge, kvmesh-router, kvmesh-prefill, kvmesh-decode, ...). Spans go to an
OTLP collector when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, batched as the SDK's `OTEL_BSP_*` variables say;
without one they are made and dropped, which still gives every log line its trace id.

The context travels as W3C `traceparent` (and `tracestate`): in gRPC metadata, injected by
every channel `kvmesh.rpc.open_channel` opens and extracted by every kvmesh server
(`kvmesh.rpc.interceptors`), and in HTTP headers at the edge. Spans follow the OpenTelemetry
conventions: a SERVER span per RPC (`rpc.system`, `rpc.service`, `rpc.method`,
`rpc.grpc.status_code`) and per HTTP request (`http.request.method`, `http.route`,
`http.response.status_code`); the decode worker's KV transfer is its own span
(`kvmesh.kv.bytes`, `kvmesh.kv.seconds`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

_configured = False


def configure(service: str, *, exporter: SpanExporter | None = None) -> None:
    """This process's tracer provider, named `service`; once (later calls do nothing).
    `exporter`: where spans go (tests); default: OTLP when the environment names an endpoint."""
    global _configured
    if _configured:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter is None and any(os.environ.get(v) for v in _ENDPOINT_VARIABLES):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _configured = True


def tracer() -> trace.Tracer:
    return trace.get_tracer("kvmesh")


def inject(carrier: MutableMapping[str, str]) -> None:
    """Add the current trace context (`traceparent`, `tracestate`) to `carrier`."""
    propagate.inject(carrier)


@contextlib.contextmanager
def server_span(
    name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any]
) -> Iterator[trace.Span]:
    """A SERVER span, child of the caller's context in `carrier`, current while inside."""
    parent = propagate.extract(carrier)
    span = tracer().start_span(name, context=parent, kind=trace.SpanKind.SERVER)
    for key, value in attributes.items():
        span.set_attribute(key, value)
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield span
    finally:
        otel_context.detach(token)
        span.end()


def current_ids() -> dict[str, str]:
    """`trace_id` and `span_id` of the current span, for log lines; {} outside any."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}
