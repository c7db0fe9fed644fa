"""/v1/catalog/*, /v1/health/*, /v1/status/*: reads of any datacenter (`?dc=`), most of them
blocking queries on the index of what they read."""

from __future__ import annotations

from aiohttp import web

from kvmesh.discovery.registry import render
from kvmesh.discovery.registry.api import agent_of, block, json_response, refuse_filter
from kvmesh.discovery.registry.catalog import CONSUL_SERVER_PORT
from kvmesh.discovery.registry.errors import BadRequestError
from kvmesh.discovery.registry.params import Query, flag
from kvmesh.discovery.registry.records import CHECK_STATUSES, Node

_STATES = ("any", *CHECK_STATUSES)


async def datacenters(request: web.Request) -> web.Response:
    """Every datacenter of the process, the agent's own first (Consul sorts by distance)."""
    agent = agent_of(request)
    names = agent.state.names
    names.remove(agent.datacenter.name)
    return json_response(request, [agent.datacenter.name, *names])


async def nodes(request: web.Request) -> web.Response:
    refuse_filter(request)
    dc = agent_of(request).target(request)
    catalog = dc.catalog
    index = await block(request, dc, lambda: catalog.node_index)
    found = (
        [render.node(dc.node, catalog.node_index)] if _node_matches(dc.node, request.query) else []
    )
    return json_response(request, found, index=index)


async def services(request: web.Request) -> web.Response:
    refuse_filter(request)
    dc = agent_of(request).target(request)
    catalog = dc.catalog
    index = await block(request, dc, lambda: catalog.services_index)
    body = catalog.service_tags() if _node_matches(dc.node, request.query) else {}
    return json_response(request, body, index=index)


async def service(request: web.Request) -> web.Response:
    refuse_filter(request)
    dc = agent_of(request).target(request)
    catalog, name = dc.catalog, request.match_info["service"]
    index = await block(request, dc, lambda: catalog.name_index(name))
    found = catalog.services(name, tuple(request.query.getall("tag", ())))
    if not _node_matches(dc.node, request.query):
        found = []
    return json_response(request, [render.catalog_service(dc.node, s) for s in found], index=index)


async def node(request: web.Request) -> web.Response:
    refuse_filter(request)
    dc = agent_of(request).target(request)
    catalog = dc.catalog
    index = await block(request, dc, lambda: catalog.services_index)
    if request.match_info["node"] != dc.node.name:
        return json_response(request, None, index=index)
    body = {
        "Node": render.node(dc.node, catalog.node_index),
        "Services": {s.service_id: render.node_service(s) for s in catalog.all_services()},
    }
    return json_response(request, body, index=index)


async def health_service(request: web.Request) -> web.Response:
    """The instances of a service with their node and checks; `?passing` keeps healthy ones."""
    refuse_filter(request)
    passing_only = flag(request.query, "passing")
    dc = agent_of(request).target(request)
    catalog, name = dc.catalog, request.match_info["service"]
    index = await block(request, dc, lambda: catalog.name_index(name))
    entries = catalog.service_entries(
        name, tuple(request.query.getall("tag", ())), passing_only=passing_only
    )
    if not _node_matches(dc.node, request.query):
        entries = []
    body = [render.service_entry(e, catalog.node_index) for e in entries]
    return json_response(request, body, index=index)


async def health_checks(request: web.Request) -> web.Response:
    refuse_filter(request)
    dc = agent_of(request).target(request)
    catalog, name = dc.catalog, request.match_info["service"]
    index = await block(request, dc, lambda: catalog.name_index(name))
    body = [render.check(c, dc.node.name) for c in catalog.checks_of_service(name)]
    return json_response(request, body, index=index)


async def health_state(request: web.Request) -> web.Response:
    refuse_filter(request)
    state = request.match_info["state"]
    if state not in _STATES:
        raise BadRequestError(f"Invalid check state {state!r}: use one of {', '.join(_STATES)}")
    dc = agent_of(request).target(request)
    catalog = dc.catalog
    index = await block(request, dc, lambda: catalog.checks_index)
    body = [render.check(c, dc.node.name) for c in catalog.checks_in_state(state)]
    return json_response(request, body, index=index)


async def health_node(request: web.Request) -> web.Response:
    refuse_filter(request)
    dc = agent_of(request).target(request)
    catalog = dc.catalog
    index = await block(request, dc, lambda: catalog.checks_index)
    found = catalog.all_checks() if request.match_info["node"] == dc.node.name else []
    return json_response(request, [render.check(c, dc.node.name) for c in found], index=index)


async def leader(request: web.Request) -> web.Response:
    dc = agent_of(request).target(request)
    return json_response(request, f"{dc.node.address}:{CONSUL_SERVER_PORT}")


async def peers(request: web.Request) -> web.Response:
    dc = agent_of(request).target(request)
    return json_response(request, [f"{dc.node.address}:{CONSUL_SERVER_PORT}"])


def _node_matches(n: Node, query: Query) -> bool:
    """`?node-meta=key:value` (repeatable): every pair must be in the node's meta."""
    for pair in query.getall("node-meta", ()):
        key, _, value = pair.partition(":")
        if n.meta.get(key) != value:
            return False
    return True


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/catalog/datacenters", datacenters)
    router.add_get("/v1/catalog/nodes", nodes)
    router.add_get("/v1/catalog/services", services)
    router.add_get("/v1/catalog/service/{service:.+}", service)
    router.add_get("/v1/catalog/node/{node:.+}", node)
    router.add_get("/v1/health/service/{service:.+}", health_service)
    router.add_get("/v1/health/checks/{service:.+}", health_checks)
    router.add_get("/v1/health/state/{state}", health_state)
    router.add_get("/v1/health/node/{node:.+}", health_node)
    router.add_get("/v1/status/leader", leader)
    router.add_get("/v1/status/peers", peers)
