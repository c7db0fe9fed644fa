"""What every HTTP request goes through: its request id, metrics and one access-log line.

The request id is the client's `x-request-id` header or a new one. It is bound in structlog's
contextvars (every log line of the request carries it), forwarded to the router as gRPC metadata,
and echoed as the `x-request-id` response header. It must be printable ASCII without spaces, at
most 128 characters: gRPC metadata allows nothing else.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence

import structlog
from opentelemetry.trace import Status, StatusCode
from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvmesh.rpc import REQUEST_ID_KEY
from kvmesh.telemetry import metrics, tracing
from services.edge.errors import InvalidRequestError

log = structlog.get_logger(__name__)

_VALID_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_QUIET_ROUTES = frozenset({"/health", "/metrics"})  # probes: logged at debug only
UNMATCHED_ROUTE = "unmatched"
_BAD_REQUEST_ID = f"'{REQUEST_ID_KEY}' must be 1 to 128 printable ASCII characters, no spaces"
CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": no response reached anyone


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._route_of(scope)
        started = time.perf_counter()
        presented = _header(scope, REQUEST_ID_KEY)
        presented_ok = presented is None or _VALID_REQUEST_ID.fullmatch(presented) is not None
        request_id = presented if presented is not None and presented_ok else new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"], state["received_at"] = request_id, started
        status = 500  # if the app fails before it starts a response

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_KEY, request_id)
            await send(message)

        in_flight = metrics.EDGE_HTTP_REQUESTS_IN_FLIGHT.labels(route)
        in_flight.inc()
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        span = tracing.server_span(
            f"{scope['method']} {route}",
            carrier,  # a client's `traceparent` makes this span its child
            {
                "http.request.method": scope["method"],
                "http.route": route,
                "url.path": scope["path"],
                "kvmesh.request_id": request_id,
            },
        )
        try:
            with span as current, structlog.contextvars.bound_contextvars(request_id=request_id):
                try:
                    if presented_ok:
                        await self.app(scope, receive, send_with_id)
                    else:
                        error = InvalidRequestError(_BAD_REQUEST_ID, param=REQUEST_ID_KEY)
                        await JSONResponse(error.body(), error.status)(scope, receive, send_with_id)
                finally:
                    current.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        current.set_status(Status(StatusCode.ERROR, str(status)))
        finally:
            in_flight.dec()
            elapsed = time.perf_counter() - started
            metrics.EDGE_HTTP_REQUESTS.labels(route, scope["method"], str(status)).inc()
            metrics.EDGE_HTTP_REQUEST_SECONDS.labels(route).observe(elapsed)
            emit = log.debug if route in _QUIET_ROUTES else log.info
            emit(
                "http request",
                request_id=request_id,
                method=scope["method"],
                route=route,
                status=status,
                duration_s=round(elapsed, 6),
            )

    def _route_of(self, scope: Scope) -> str:
        """The matching route's template ("/v1/models/{model}"): bounded label values."""
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return str(getattr(route, "path", UNMATCHED_ROUTE))
        return UNMATCHED_ROUTE


def _header(scope: Scope, name: str) -> str | None:
    key = name.encode()
    for k, v in scope["headers"]:
        if k == key:
            return str(v.decode("latin-1"))
    return None
