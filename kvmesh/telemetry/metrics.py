"""Every kvmesh metric, in one module.

Names: prefix `kvmesh_`, base units in the suffix (`_seconds`, `_bytes`, `_tokens`), `_total`
only on counters, no colons. Services import the objects from here; nothing else defines one.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

# -- every gRPC server (kvmesh.rpc) -----------------------------------------------------------
RPC_SERVER_HANDLED = Counter(
    "kvmesh_rpc_server_handled_total",
    "RPCs completed by the server, by method and status code.",
    ["service", "method", "code"],
)
RPC_SERVER_HANDLING_SECONDS = Histogram(
    "kvmesh_rpc_server_handling_seconds",
    "Time from receiving an RPC to its last response message.",
    ["service", "method"],
    buckets=_LATENCY_BUCKETS,
)

# -- request latency, seen by the router ----------------------------------------------------------
# `tier` of TTFT: the tier that computed the prompt (prefill on the disaggregated path, decode
# when the decode worker prefilled it itself). ITL is the decode tier's; E2E the whole request's.
TTFT_SECONDS = Histogram(
    "kvmesh_ttft_seconds", "Time from a request's arrival at the router to its first token.",
    ["model", "tier"], buckets=_LATENCY_BUCKETS,
)  # fmt: skip
ITL_SECONDS = Histogram(
    "kvmesh_itl_seconds", "Time between a request's tokens at the router (decode tier).",
    ["model"], buckets=_LATENCY_BUCKETS,
)  # fmt: skip
E2E_SECONDS = Histogram(
    "kvmesh_e2e_seconds", "Time from a request's arrival at the router to its last token.",
    ["model"], buckets=_LATENCY_BUCKETS,
)  # fmt: skip

# -- KV transfer ---------------------------------------------------------------------------------
KV_TRANSFER_BYTES = Counter(
    "kvmesh_kv_transfer_bytes_total", "KV cache bytes moved between workers.", ["direction"]
)
KV_TRANSFER_SECONDS = Histogram(
    "kvmesh_kv_transfer_seconds", "Duration of one request's KV transfer.",
    buckets=_LATENCY_BUCKETS,
)  # fmt: skip
KV_HANDLES = Counter(
    "kvmesh_kv_handles_total",
    "KV handles a decode worker was given: verified (used), unverified (its prefill worker is "
    "not in discovery: computed locally), refused (forged, altered, expired, another prompt), "
    "read_raced_expiry (the lease could have run out during the READ: computed locally).",
    ["outcome"],
)

# -- router --------------------------------------------------------------------------------------
ROUTER_DECISIONS = Counter(
    "kvmesh_router_decisions_total",
    "Routing decisions, by tier, policy and reason (prefix hit, load, bounded-load guard).",
    ["tier", "policy", "reason"],
)
ROUTER_DECISION_SECONDS = Histogram(
    "kvmesh_router_decision_seconds",
    "Time to choose a worker (hashing the prompt and scoring the candidates).",
    ["tier"],
    buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
)
ROUTER_PREFIX_BLOCKS = Counter(
    "kvmesh_router_prefix_blocks_total",
    "Full prompt blocks routed, and those the chosen worker held already (the index's view).",
    ["tier", "kind"],  # kind: prompt | hit
)
ROUTER_WORKER_IN_FLIGHT = Gauge(
    "kvmesh_router_worker_in_flight",
    "Requests this router has sent to a worker and not yet seen finish (its queue there).",
    ["tier", "worker_id"],
)
ROUTER_KV_INDEX_ENTRIES = Gauge(
    "kvmesh_router_kv_index_entries", "(worker, block) pairs in the router's prefix index."
)
ROUTER_KV_INDEX_BLOCKS = Gauge(
    "kvmesh_router_kv_index_blocks", "Distinct block hashes in the router's prefix index."
)
ROUTER_KV_INDEX_EXACT = Gauge(
    "kvmesh_router_kv_index_exact",
    "1 while a worker is indexed from its KV events, 0 while indexed approximately.",
    ["worker_id"],
)
ROUTER_KV_INDEX_FALLBACKS = Counter(
    "kvmesh_router_kv_index_fallbacks_total",
    "Times a worker's index fell back to approximate (its events broke, stalled or are absent).",
    ["reason"],
)
ROUTER_KV_EVENT_GAPS = Counter(
    "kvmesh_router_kv_event_gaps_total", "KV event gaps seen, each followed by a resync."
)

# -- autoscaler ----------------------------------------------------------------------------------
AUTOSCALER_DESIRED_REPLICAS = Gauge(
    "kvmesh_autoscaler_desired_replicas", "Replicas the autoscaler wants.", ["model", "tier"]
)
AUTOSCALER_ACTUAL_REPLICAS = Gauge(
    "kvmesh_autoscaler_actual_replicas", "Replicas running.", ["model", "tier"]
)

# -- discovery -----------------------------------------------------------------------------------
DISCOVERY_WATCH_ERRORS = Counter(
    "kvmesh_discovery_watch_errors_total", "Failed blocking queries (retried with backoff).",
    ["service"],
)  # fmt: skip

# -- engine (read from the engine's own counters at scrape time) --------------------------------
ENGINE_COUNTERS = {  # metric name -> EngineStats field
    "kvmesh_engine_computed_tokens_total": "num_computed_tokens",
    "kvmesh_engine_prompt_tokens_total": "num_prompt_tokens",
    "kvmesh_engine_prefix_hit_tokens_total": "num_prefix_hit_tokens",
    "kvmesh_engine_imported_tokens_total": "num_imported_tokens",
    "kvmesh_engine_generated_tokens_total": "num_generated_tokens",
    "kvmesh_engine_preemptions_total": "num_preemptions",
    "kvmesh_engine_requests_finished_total": "num_requests_finished",
    "kvmesh_engine_requests_aborted_total": "num_requests_aborted",
    "kvmesh_engine_requests_failed_total": "num_requests_failed",
    "kvmesh_engine_spec_verifications_total": "num_spec_verifications",
    "kvmesh_engine_spec_draft_tokens_total": "num_spec_draft_tokens",
    "kvmesh_engine_spec_accepted_tokens_total": "num_spec_accepted_tokens",
}
ENGINE_GAUGES = {  # metric name -> LoadSnapshot field
    "kvmesh_engine_running_requests": "num_running",
    "kvmesh_engine_waiting_requests": "num_waiting",
    "kvmesh_engine_kv_blocks_used": "num_blocks_used",
    "kvmesh_engine_kv_blocks_total": "num_blocks_total",
    "kvmesh_engine_kv_blocks_pinned": "num_blocks_pinned",
}

# -- workers: leases and KV transfer -------------------------------------------------------------
WORKER_LEASES_ACTIVE = Gauge("kvmesh_worker_leases_active", "KV exports pinned under a lease.")
WORKER_LEASES = Counter(
    "kvmesh_worker_leases_total", "Leases ended, by how: released or expired.", ["outcome"]
)

# -- router: migration and retries ---------------------------------------------------------------
ROUTER_MIGRATIONS = Counter(
    "kvmesh_router_migrations_total",
    "Requests moved to another decode worker after theirs failed mid-stream.",
)
ROUTER_PREFILL_RETRIES = Counter(
    "kvmesh_router_prefill_retries_total", "Prefills retried on another worker."
)
ROUTER_EJECTIONS = Counter(
    "kvmesh_router_ejections_total",
    "Workers ejected as outliers (consecutive failures, success rate or latency), by tier.",
    ["tier"],
)
ROUTER_RETRIES_DENIED = Counter(
    "kvmesh_router_retries_denied_total",
    "Retries (prefill retries, decode migrations) refused because the retry budget was spent.",
)
ROUTER_REQUESTS = Counter(
    "kvmesh_router_requests_total", "Generate requests by outcome.", ["path", "outcome"]
)

# -- router: admission (shedding, wake on request) ------------------------------------------------
ROUTER_REQUESTS_IN_FLIGHT = Gauge(
    "kvmesh_router_requests_in_flight",
    "Generate requests this router has admitted and not yet finished.",
)
ROUTER_REQUESTS_WAITING = Gauge(
    "kvmesh_router_requests_waiting",
    "Generate requests waiting for a decode worker to appear (the wake key is written meanwhile).",
)
ROUTER_REQUESTS_QUEUED = Gauge(
    "kvmesh_router_requests_queued",
    "Generate requests waiting for one of the router's --max-in-flight slots.",
)
ROUTER_SHED = Counter(
    "kvmesh_router_shed_total",
    "Generate requests refused at once, by reason: no_decode_workers or saturated (callers "
    "that can go elsewhere, x-kvmesh-spill), queue_full (any caller, past --max-queue).",
    ["reason"],
)


def zero(metric: Counter, *label_values: str | tuple[str, ...]) -> None:
    """Export `metric` at 0 for each known label value (a tuple for several labels) before
    anything is counted, so that its series exist (dashboards and rate() see them) from the
    start. Components call it for the values they count."""
    for value in label_values:
        metric.labels(*(value if isinstance(value, tuple) else (value,)))


class EngineCollector:
    """Exposes an engine's counters and load (anything with `.stats()` and `.load()`)."""

    def __init__(self, engine: object, tier: str) -> None:
        self._engine = engine
        self._tier = tier

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats()  # type: ignore[attr-defined]
        load = self._engine.load()  # type: ignore[attr-defined]
        for name, field in ENGINE_COUNTERS.items():
            family = CounterMetricFamily(name.removesuffix("_total"), field, labels=["tier"])
            family.add_metric([self._tier], getattr(stats, field))
            yield family
        for name, field in ENGINE_GAUGES.items():
            gauge = GaugeMetricFamily(name, field, labels=["tier"])
            gauge.add_metric([self._tier], getattr(load, field))
            yield gauge


# -- edge (services/edge: the HTTP/SSE OpenAI-compatible front door) ----------------------------
# The edge has its own latency series: the TTFT / E2E histograms above are the router's, and an
# edge observing into them would count each request twice wherever both run in one process.
EDGE_HTTP_REQUESTS = Counter(
    "kvmesh_edge_http_requests_total",
    "HTTP requests answered by the edge, by route, method and status (499: the client left).",
    ["route", "method", "status"],
)
EDGE_HTTP_REQUEST_SECONDS = Histogram(
    "kvmesh_edge_http_request_seconds",
    "Time from an HTTP request's arrival to its response's last byte (a stream's whole life).",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
EDGE_HTTP_REQUESTS_IN_FLIGHT = Gauge(
    "kvmesh_edge_http_requests_in_flight", "HTTP requests being answered.", ["route"]
)
EDGE_TTFT_SECONDS = Histogram(
    "kvmesh_edge_ttft_seconds",
    "Time from a generation request's arrival at the edge to the router's first response.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
EDGE_ITL_SECONDS = Histogram(
    "kvmesh_edge_itl_seconds",
    "Time between a stream's content events at the edge, per token they carry.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
EDGE_E2E_SECONDS = Histogram(
    "kvmesh_edge_e2e_seconds",
    "Time from a generation request's arrival at the edge to its last token (answers that end "
    "well).",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
EDGE_CANCELLED_GENERATIONS = Counter(
    "kvmesh_edge_cancelled_generations_total",
    "Generations given up because the client left or the edge stopped (gRPC call cancelled).",
    ["route"],
)
EDGE_CLUSTER_REQUESTS = Counter(
    "kvmesh_edge_cluster_requests_total",
    "Generation attempts on a cluster's router, by outcome: served, spilled (refused as "
    "saturated; tried the next cluster), failed_over (unavailable before or during the stream; "
    "tried or resumed on the next cluster), error (answered to the client), cancelled.",
    ["cluster", "outcome"],
)
