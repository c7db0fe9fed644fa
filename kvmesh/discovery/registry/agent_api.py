"""/v1/agent/*: what a client asks of its local agent. It always acts on the agent's own
datacenter; `?dc=` does not apply here, as in Consul."""

from __future__ import annotations

import time

from aiohttp import web

from kvmesh.discovery.registry import render
from kvmesh.discovery.registry.api import agent_of, json_response, refuse_filter
from kvmesh.discovery.registry.decode import decode_check, decode_check_update, decode_service
from kvmesh.discovery.registry.params import flag
from kvmesh.discovery.registry.records import CRITICAL, PASSING, WARNING, CheckStatus

_TTL_VERBS: dict[str, CheckStatus] = {"pass": PASSING, "warn": WARNING, "fail": CRITICAL}


async def register_service(request: web.Request) -> web.Response:
    agent = agent_of(request)
    replace_checks = flag(request.query, "replace-existing-checks")
    definition = decode_service(await request.read())
    agent.datacenter.catalog.register_service(
        definition, time.monotonic(), replace_existing_checks=replace_checks
    )
    return web.Response()


async def deregister_service(request: web.Request) -> web.Response:
    agent_of(request).datacenter.catalog.deregister_service(request.match_info["service_id"])
    return web.Response()


async def register_check(request: web.Request) -> web.Response:
    definition = decode_check(await request.read())
    agent_of(request).datacenter.catalog.register_check(definition, time.monotonic())
    return web.Response()


async def deregister_check(request: web.Request) -> web.Response:
    agent_of(request).datacenter.catalog.deregister_check(request.match_info["check_id"])
    return web.Response()


async def ttl_verb(request: web.Request) -> web.Response:
    """PUT /v1/agent/check/{pass,warn,fail}/:check_id?note=..."""
    status = _TTL_VERBS[request.match_info["verb"]]
    note = request.query.get("note", "")
    catalog = agent_of(request).datacenter.catalog
    catalog.update_ttl(request.match_info["check_id"], status, note, time.monotonic())
    return web.Response()


async def update_check(request: web.Request) -> web.Response:
    """PUT /v1/agent/check/update/:check_id with {"Status": ..., "Output": ...}."""
    status, output = decode_check_update(await request.read())
    catalog = agent_of(request).datacenter.catalog
    catalog.update_ttl(request.match_info["check_id"], status, output, time.monotonic())
    return web.Response()


async def services(request: web.Request) -> web.Response:
    refuse_filter(request)
    dc = agent_of(request).datacenter
    body = {s.service_id: render.agent_service(s, dc.name) for s in dc.catalog.agent_services()}
    return json_response(request, body)


async def service(request: web.Request) -> web.Response:
    dc = agent_of(request).datacenter
    found = dc.catalog.agent_service(request.match_info["service_id"])
    return json_response(request, render.agent_service(found, dc.name, with_hash=True))


async def checks(request: web.Request) -> web.Response:
    refuse_filter(request)
    dc = agent_of(request).datacenter
    body = {c.check_id: render.check(c, dc.node.name) for c in dc.catalog.agent_checks()}
    return json_response(request, body)


async def self_(request: web.Request) -> web.Response:
    agent = agent_of(request)
    return json_response(request, render.agent_self(agent.datacenter.node, agent.state.primary))


async def members(request: web.Request) -> web.Response:
    agent = agent_of(request)
    if flag(request.query, "wan"):
        return json_response(request, [render.member(dc.node) for dc in agent.state])
    return json_response(request, [render.member(agent.datacenter.node)])


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_put("/v1/agent/service/register", register_service)
    router.add_put("/v1/agent/service/deregister/{service_id:.+}", deregister_service)
    router.add_get("/v1/agent/service/{service_id:.+}", service)
    router.add_put("/v1/agent/check/register", register_check)
    router.add_put("/v1/agent/check/deregister/{check_id:.+}", deregister_check)
    router.add_put("/v1/agent/check/{verb:pass|warn|fail}/{check_id:.+}", ttl_verb)
    router.add_put("/v1/agent/check/update/{check_id:.+}", update_check)
    router.add_get("/v1/agent/services", services)
    router.add_get("/v1/agent/checks", checks)
    router.add_get("/v1/agent/self", self_)
    router.add_get("/v1/agent/members", members)
