"""One aiohttp application per agent: routes, and errors as Consul writes them.

Errors are plain text with Consul's status codes: 400 for bad input (never a 500), 404 for an
unknown service or check id, 405 for a method an endpoint does not take, 413 for a KV value
over the limit, 500 "No path to datacenter" for an unknown `?dc=`. An unexpected exception is
a bug: it is logged and answered with a 500, and the agent keeps serving.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from kvmesh.discovery.registry import agent_api, catalog_api, kv_api, prometheus_api
from kvmesh.discovery.registry.acl import AclConfig
from kvmesh.discovery.registry.api import AGENT, Agent
from kvmesh.discovery.registry.errors import RegistryError
from kvmesh.discovery.registry.state import Datacenter, RegistryState

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 1024 * 1024  # above the KV value limit, so that the KV limit answers first


def build_app(
    state: RegistryState, datacenter: Datacenter, acl: AclConfig | None = None
) -> web.Application:
    middlewares = [_consul_errors] + ([_acl_middleware(acl)] if acl is not None else [])
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[AGENT] = Agent(state, datacenter)
    agent_api.add_routes(app.router)
    catalog_api.add_routes(app.router)
    kv_api.add_routes(app.router)
    prometheus_api.add_routes(app.router)
    return app


def _acl_middleware(acl: AclConfig) -> Any:
    @web.middleware
    async def check_acl(request: web.Request, handler: Handler) -> web.StreamResponse:
        acl.check(request)  # inside _consul_errors: a refusal is a plain-text 403
        return await handler(request)

    return check_acl


@web.middleware
async def _consul_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RegistryError as e:
        return web.Response(status=e.status, text=str(e))
    except web.HTTPException as e:  # aiohttp's own: no route, wrong method, body too large
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return web.Response(status=e.status, text=_http_error_text(request, e), headers=allow)
    except Exception as e:
        log.exception("registry request failed", method=request.method, path=request.path)
        return web.Response(status=500, text=f"Internal error: {e!r}")


def _http_error_text(request: web.Request, error: web.HTTPException) -> str:
    if isinstance(error, web.HTTPMethodNotAllowed):
        return f"method {request.method} not allowed"
    if isinstance(error, web.HTTPNotFound):
        return "404 page not found"
    if isinstance(error, web.HTTPRequestEntityTooLarge):
        return f"Request body too large, max size: {MAX_BODY_BYTES} bytes"
    return error.text or error.reason
