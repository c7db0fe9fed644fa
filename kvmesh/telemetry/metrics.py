"""Every kvmesh metric, in one module.

Names: prefix `kvmesh_`, base units in the suffix (`_seconds`, `_bytes`, `_tokens`), `_total`
only on counters, no colons. Services import the objects from here; nothing else defines one.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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

# -- request latency, seen by the router (issue 4 and later) -----------------------------------
TTFT_SECONDS = Histogram(
    "kvmesh_ttft_seconds", "Time to first token.", ["model"], buckets=_LATENCY_BUCKETS
)
ITL_SECONDS = Histogram(
    "kvmesh_itl_seconds", "Inter-token latency.", ["model"], buckets=_LATENCY_BUCKETS
)
E2E_SECONDS = Histogram(
    "kvmesh_e2e_seconds", "Request latency, first byte in to last byte out.", ["model"],
    buckets=_LATENCY_BUCKETS,
)  # fmt: skip

# -- KV transfer ---------------------------------------------------------------------------------
KV_TRANSFER_BYTES = Counter(
    "kvmesh_kv_transfer_bytes_total", "KV cache bytes moved between workers.", ["direction"]
)
KV_TRANSFER_SECONDS = Histogram(
    "kvmesh_kv_transfer_seconds", "Duration of one request's KV transfer.",
    buckets=_LATENCY_BUCKETS,
)  # fmt: skip

# -- workers -------------------------------------------------------------------------------------
WORKER_RUNNING_REQUESTS = Gauge(
    "kvmesh_worker_running_requests", "Requests in the running batch.", ["tier"]
)
WORKER_WAITING_REQUESTS = Gauge(
    "kvmesh_worker_waiting_requests", "Requests waiting to be scheduled.", ["tier"]
)
WORKER_KV_BLOCKS_USED = Gauge("kvmesh_worker_kv_blocks_used", "KV blocks in use.", ["tier"])
WORKER_KV_BLOCKS_TOTAL = Gauge("kvmesh_worker_kv_blocks_total", "KV blocks in the pool.", ["tier"])
PREFIX_HIT_RATIO = Gauge(
    "kvmesh_prefix_hit_ratio", "Prompt tokens served from the prefix cache, over prompt tokens."
)

# -- router --------------------------------------------------------------------------------------
ROUTER_DECISIONS = Counter(
    "kvmesh_router_decisions_total", "Routing decisions, by tier and reason.", ["tier", "reason"]
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
