"""kvmesh's Grafana dashboards, defined once here and written as JSON to `deploy/grafana/`.

    python -m kvmesh.telemetry.dashboards            # rewrite deploy/grafana/*.json
    python -m kvmesh.telemetry.dashboards --check    # fail if they differ from these

Every panel is PromQL over the metrics `kvmesh/telemetry/metrics.py` declares (a test checks
that each expression names only exported metrics). `render.py` draws the same panels from a
Prometheus with matplotlib, for the screenshots in docs/dashboards/.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "grafana"


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    exprs: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"


def _q(metric: str, q: float, by: str = "") -> str:
    group = f"le{', ' + by if by else ''}"
    return f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[1m])))"


DASHBOARDS: dict[str, tuple[str, list[Panel]]] = {
    "mesh-overview": (
        "kvmesh: mesh overview",
        [
            Panel("Requests / s by path and outcome", (
                ("sum by (path, outcome) (rate(kvmesh_router_requests_total[1m]))",
                 "{{path}} {{outcome}}"),
            ), "reqps"),
            Panel("TTFT at the router (p50, p99)", (
                (_q("kvmesh_ttft_seconds", 0.5), "p50"), (_q("kvmesh_ttft_seconds", 0.99), "p99"),
            ), "s"),
            Panel("ITL at the router (p50, p99)", (
                (_q("kvmesh_itl_seconds", 0.5), "p50"), (_q("kvmesh_itl_seconds", 0.99), "p99"),
            ), "s"),
            Panel("End to end at the edge (p50, p99)", (
                (_q("kvmesh_edge_e2e_seconds", 0.5), "p50"),
                (_q("kvmesh_edge_e2e_seconds", 0.99), "p99"),
            ), "s"),
            Panel("HTTP answers / s by status", (
                ("sum by (status) (rate(kvmesh_edge_http_requests_total[1m]))", "{{status}}"),
            ), "reqps"),
            Panel("In flight and queued at the routers", (
                ("sum(kvmesh_router_requests_in_flight)", "in flight"),
                ("sum(kvmesh_router_requests_queued)", "queued"),
            )),
            Panel("Generated tokens / s by tier", (
                ("sum by (tier) (rate(kvmesh_engine_generated_tokens_total[1m]))", "{{tier}}"),
            )),
            Panel("Migrations, prefill retries, ejections / s", (
                ("sum(rate(kvmesh_router_migrations_total[1m]))", "migrations"),
                ("sum(rate(kvmesh_router_prefill_retries_total[1m]))", "prefill retries"),
                ("sum by (tier) (rate(kvmesh_router_ejections_total[1m]))", "ejections {{tier}}"),
            )),
        ],
    ),
    "routing-and-cache": (
        "kvmesh: routing and prefix cache",
        [
            Panel("Prefix hit share of routed blocks", (
                ('sum(rate(kvmesh_router_prefix_blocks_total{kind="hit"}[1m])) / '
                 'sum(rate(kvmesh_router_prefix_blocks_total{kind="prompt"}[1m]))', "hit share"),
            ), "percentunit"),
            Panel("Engine prefix-hit tokens / prompt tokens", (
                ("sum(rate(kvmesh_engine_prefix_hit_tokens_total[1m])) / "
                 "sum(rate(kvmesh_engine_prompt_tokens_total[1m]))", "hit ratio"),
            ), "percentunit"),
            Panel("Decisions / s by tier and reason", (
                ("sum by (tier, reason) (rate(kvmesh_router_decisions_total[1m]))",
                 "{{tier}} {{reason}}"),
            )),
            Panel("Decision time p99", (
                (_q("kvmesh_router_decision_seconds", 0.99, "tier"), "{{tier}}"),
            ), "s"),
            Panel("Requests in flight per worker", (
                ("sum by (tier, worker_id) (kvmesh_router_worker_in_flight)",
                 "{{tier}} {{worker_id}}"),
            )),
            Panel("Prefix index size", (
                ("sum(kvmesh_router_kv_index_entries)", "entries"),
                ("sum(kvmesh_router_kv_index_blocks)", "blocks"),
            )),
            Panel("Index fallbacks and event gaps / s", (
                ("sum by (reason) (rate(kvmesh_router_kv_index_fallbacks_total[5m]))",
                 "fallback {{reason}}"),
                ("sum(rate(kvmesh_router_kv_event_gaps_total[5m]))", "event gaps"),
            )),
            Panel("Shed / s by reason", (
                ("sum by (reason) (rate(kvmesh_router_shed_total[1m]))", "{{reason}}"),
            ), "reqps"),
        ],
    ),
    "kv-transfer": (
        "kvmesh: KV transfer",
        [
            Panel("KV bytes received / s", (
                ("sum(rate(kvmesh_kv_transfer_bytes_total[1m]))", "bytes/s"),
            ), "Bps"),
            Panel("Transfer time (p50, p99)", (
                (_q("kvmesh_kv_transfer_seconds", 0.5), "p50"),
                (_q("kvmesh_kv_transfer_seconds", 0.99), "p99"),
            ), "s"),
            Panel("Handles / s by outcome", (
                ("sum by (outcome) (rate(kvmesh_kv_handles_total[1m]))", "{{outcome}}"),
            )),
            Panel("Leases active and ended / s", (
                ("sum(kvmesh_worker_leases_active)", "active"),
                ("sum by (outcome) (rate(kvmesh_worker_leases_total[1m]))", "{{outcome}}"),
            )),
            Panel("Imported tokens / s", (
                ("sum(rate(kvmesh_engine_imported_tokens_total[1m]))", "imported"),
            )),
            Panel("KV blocks used, pinned, total", (
                ("sum by (tier) (kvmesh_engine_kv_blocks_used)", "used {{tier}}"),
                ("sum by (tier) (kvmesh_engine_kv_blocks_pinned)", "pinned {{tier}}"),
                ("sum by (tier) (kvmesh_engine_kv_blocks_total)", "total {{tier}}"),
            )),
        ],
    ),
    "autoscaling": (
        "kvmesh: autoscaling",
        [
            Panel("Desired and actual replicas", (
                ("sum by (tier) (kvmesh_autoscaler_desired_replicas)", "desired {{tier}}"),
                ("sum by (tier) (kvmesh_autoscaler_actual_replicas)", "actual {{tier}}"),
            )),
            Panel("Running and waiting requests in the engines", (
                ("sum by (tier) (kvmesh_engine_running_requests)", "running {{tier}}"),
                ("sum by (tier) (kvmesh_engine_waiting_requests)", "waiting {{tier}}"),
            )),
            Panel("TTFT p90 by tier (what SLA mode reads)", (
                (_q("kvmesh_ttft_seconds", 0.9, "tier"), "{{tier}}"),
            ), "s"),
            Panel("Mean ITL (what SLA mode reads)", (
                ("sum(rate(kvmesh_itl_seconds_sum[1m])) / sum(rate(kvmesh_itl_seconds_count[1m]))",
                 "mean ITL"),
            ), "s"),
            Panel("Requests waiting for a tier to wake", (
                ("sum(kvmesh_router_requests_waiting)", "waiting"),
            )),
            Panel("Preemptions and failed requests / s", (
                ("sum by (tier) (rate(kvmesh_engine_preemptions_total[1m]))", "preempt {{tier}}"),
                ("sum by (tier) (rate(kvmesh_engine_requests_failed_total[1m]))",
                 "failed {{tier}}"),
            )),
            Panel("Speculative decoding: drafts accepted, tokens per verify step", (
                ("sum by (tier) (rate(kvmesh_engine_spec_accepted_tokens_total[5m])) / "
                 "sum by (tier) (rate(kvmesh_engine_spec_draft_tokens_total[5m]))",
                 "acceptance {{tier}}"),
                ("1 + sum by (tier) (rate(kvmesh_engine_spec_accepted_tokens_total[5m])) / "
                 "sum by (tier) (rate(kvmesh_engine_spec_verifications_total[5m]))",
                 "tokens per verify {{tier}}"),
            )),
        ],
    ),
    "clusters": (
        "kvmesh: clusters",
        [
            Panel("Edge attempts / s by cluster and outcome", (
                ("sum by (cluster, outcome) (rate(kvmesh_edge_cluster_requests_total[1m]))",
                 "{{cluster}} {{outcome}}"),
            ), "reqps"),
            Panel("Router requests / s by cluster", (
                ("sum by (cluster) (rate(kvmesh_router_requests_total[1m]))", "{{cluster}}"),
            ), "reqps"),
            Panel("Edge TTFT p99", ((_q("kvmesh_edge_ttft_seconds", 0.99), "p99"),), "s"),
            Panel("Cancelled generations / s", (
                ("sum by (route) (rate(kvmesh_edge_cancelled_generations_total[1m]))",
                 "{{route}}"),
            )),
            Panel("Discovery watch errors / s", (
                ("sum by (service) (rate(kvmesh_discovery_watch_errors_total[1m]))",
                 "{{service}}"),
            )),
            Panel("RPCs / s by service and code", (
                ("sum by (service, code) (rate(kvmesh_rpc_server_handled_total[1m]))",
                 "{{service}} {{code}}"),
            )),
        ],
    ),
}  # fmt: skip


def grafana(uid: str, title: str, panels: list[Panel]) -> dict[str, Any]:
    """A Grafana dashboard (schema 39) on a Prometheus datasource chosen at import."""
    return {
        "uid": f"kvmesh-{uid}",
        "title": title,
        "tags": ["kvmesh"],
        "schemaVersion": 39,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "templating": {
            "list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]
        },
        "panels": [
            {
                "id": i + 1,
                "type": "timeseries",
                "title": panel.title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend}
                    for j, (expr, legend) in enumerate(panel.exprs)
                ],
            }
            for i, panel in enumerate(panels)
        ],
    }


def rendered() -> dict[str, str]:
    """File name -> its JSON text."""
    return {
        f"{uid}.json": json.dumps(grafana(uid, title, panels), indent=2) + "\n"
        for uid, (title, panels) in DASHBOARDS.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kvmesh.telemetry.dashboards")
    parser.add_argument("--check", action="store_true", help="fail if deploy/grafana differs")
    args = parser.parse_args()
    stale = []
    for name, text in rendered().items():
        path = DEPLOY / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            DEPLOY.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        names = ", ".join(stale)
        sys.exit(f"deploy/grafana is stale ({names}): run python -m kvmesh.telemetry.dashboards")


if __name__ == "__main__":
    main()
