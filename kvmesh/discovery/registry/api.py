"""What every endpoint shares: which agent answers, `?dc=`, JSON answers and blocking reads."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from kvmesh.discovery.registry.errors import UnsupportedError
from kvmesh.discovery.registry.params import blocking_options, present
from kvmesh.discovery.registry.state import Datacenter, RegistryState


@dataclass(frozen=True, slots=True)
class Agent:
    """The agent an HTTP listener stands for: its own datacenter, within the whole registry."""

    state: RegistryState
    datacenter: Datacenter

    def target(self, request: web.Request) -> Datacenter:
        """The datacenter a catalog/health/KV request reads or writes (`?dc=`, else our own)."""
        name = request.query.get("dc", "")
        return self.state.datacenter(name) if name else self.datacenter


AGENT = web.AppKey("agent", Agent)


def agent_of(request: web.Request) -> Agent:
    return request.app[AGENT]


def json_response(request: web.Request, body: Any, *, index: int | None = None) -> web.Response:
    """A JSON answer; with `index`, the headers Consul puts on every catalog read."""
    indent = 4 if present(request.query, "pretty") else None
    headers = {}
    if index is not None:
        headers = {
            "X-Consul-Index": str(max(1, index)),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
        }
    return web.Response(
        text=json.dumps(body, indent=indent),
        content_type="application/json",
        headers=headers,
    )


def not_found(index: int) -> web.Response:
    """Consul's answer to a read of nothing: 404, empty body, the index to block on."""
    return web.Response(
        status=404,
        headers={
            "X-Consul-Index": str(max(1, index)),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
        },
    )


async def block(request: web.Request, datacenter: Datacenter, current: Callable[[], int]) -> int:
    """Hold a blocking read until its index moves past `?index=`; then the index to answer with.

    `wait` and `index` are validated on every read, blocking or not, as Consul does.
    """
    options = blocking_options(request.query)
    if options.index:
        await datacenter.index.wait_past(options.index, current, options.wait_s)
    return current()


def refuse_filter(request: web.Request) -> None:
    if request.query.get("filter"):
        raise UnsupportedError(
            "Failed to create boolean expression evaluator: filter expressions are not "
            "supported by the embedded registry"
        )


def true_or_false(request: web.Request, ok: bool) -> web.Response:
    return json_response(request, ok)
