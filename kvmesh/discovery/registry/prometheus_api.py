"""GET /v1/kvmesh/prometheus/targets: Prometheus's HTTP service discovery (`http_sd_configs`).

Not part of Consul's API: Prometheus would use its Consul service discovery against a real
agent, but distribution builds of Prometheus may leave that out, and HTTP discovery is always
there. The answer lists every passing instance of every datacenter that registered a
`metrics_port` in its meta, as Prometheus's HTTP SD format wants:

    [{"targets": ["127.0.0.1:41235"], "labels": {"service": "kvmesh-decode",
      "cluster": "dc1", "service_id": "decode-1a2b"}}, ...]
"""

from __future__ import annotations

from aiohttp import web

from kvmesh.discovery.registry.api import agent_of, json_response


async def targets(request: web.Request) -> web.Response:
    found = []
    for dc in agent_of(request).state:
        for service in dc.catalog.agent_services():
            entries = dc.catalog.service_entries(service.name, passing_only=True)
            for entry in entries:
                definition = entry.service.definition
                if entry.service.service_id != service.service_id:
                    continue
                port = definition.meta.get("metrics_port", "")
                if not port.isdigit():
                    continue
                address = definition.address or dc.node.address
                found.append(
                    {
                        "targets": [f"{address}:{port}"],
                        "labels": {
                            "service": definition.name,
                            "cluster": dc.name,
                            "service_id": definition.service_id,
                        },
                    }
                )
    return json_response(request, found)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/kvmesh/prometheus/targets", targets)
