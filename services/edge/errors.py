"""The edge's errors, and the one mapping from the router's gRPC status to an HTTP answer.

    EdgeError                        anything the edge raises on purpose
    ├── StartupError                 the HTTP server could not start (address in use, ...)
    ├── ClientDisconnectedError      the HTTP client left; there is no one to answer
    └── ApiError                     an answer for the HTTP client: status + OpenAI error body
        ├── InvalidRequestError      400  the edge's own shape and type checks
        ├── RequestTooLargeError     413  the body is over `max_body_bytes`
        └── RouterError              the router's answer, mapped by `from_status` (which keeps
                                     the gRPC status: clusters.py decides on it where to go next)

Every `ApiError` renders as OpenAI's error body, so the official clients raise their usual
exceptions: `{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`.

Messages the router writes for the caller (bad input, unknown model, shed load, auth) pass
through unchanged, so gRPC and HTTP clients read the same words. Messages of failures inside the
mesh (unavailable, deadline, internal) are replaced by a generic one that names the request id:
they can carry internal addresses, and the caller cannot act on them anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from kvmesh.rpc import errors as rpc_errors


class EdgeError(Exception):
    """Base of the edge's error tree."""


class StartupError(EdgeError):
    """The HTTP server did not start."""


class ClientDisconnectedError(EdgeError):
    """The HTTP client closed the connection before its answer was ready."""


class ApiError(EdgeError):
    """An error answered to the HTTP client in OpenAI's shape."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        type: str,  # OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.upstream: str | None = None  # the router's own status and message, for the log

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(ApiError):
    """The request's shape or types are wrong; `param` names the field."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, status=400, type="invalid_request_error", param=param, code=code)


class RequestTooLargeError(ApiError):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(
            f"the request body is larger than {max_bytes} bytes",
            status=413,
            type="invalid_request_error",
            code="request_too_large",
        )


class RouterError(ApiError):
    """The router failed the call (or broke the stream's contract); see `from_status`."""

    grpc_status: grpc.StatusCode | None = None  # the router's status; None: a broken contract


@dataclass(frozen=True, slots=True)
class HttpMapping:
    status: int
    type: str
    code: str | None
    param: str | None = None
    pass_message: bool = True  # False: a generic message naming the request id


# The one table from the router's status codes to HTTP; codes not listed map to `_INTERNAL`.
STATUS_TO_HTTP: dict[grpc.StatusCode, HttpMapping] = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpMapping(400, "invalid_request_error", None),
    grpc.StatusCode.NOT_FOUND: HttpMapping(
        404, "invalid_request_error", "model_not_found", param="model"
    ),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpMapping(429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAUTHENTICATED: HttpMapping(401, "authentication_error", "unauthenticated"),
    grpc.StatusCode.PERMISSION_DENIED: HttpMapping(403, "permission_error", "permission_denied"),
    grpc.StatusCode.UNAVAILABLE: HttpMapping(
        503, "server_error", "service_unavailable", pass_message=False
    ),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpMapping(
        504, "server_error", "timeout", pass_message=False
    ),
}
_INTERNAL = HttpMapping(500, "server_error", "internal_error", pass_message=False)

_GENERIC_MESSAGES = {
    503: "the service is temporarily unavailable; retry later",
    504: "the request did not finish before its deadline",
    500: "internal error",
}


def from_status(code: grpc.StatusCode, message: str, *, request_id: str) -> RouterError:
    """The HTTP answer for a router call that ended with `code` and `message`."""
    mapping = STATUS_TO_HTTP.get(code, _INTERNAL)
    answer = message
    if not mapping.pass_message or not message:
        answer = f"{_GENERIC_MESSAGES.get(mapping.status, 'error')} (request id {request_id})"
    error = RouterError(
        answer, status=mapping.status, type=mapping.type, param=mapping.param, code=mapping.code
    )
    error.upstream = f"{code.name}: {message}"
    error.grpc_status = code
    return error


def from_rpc_error(error: grpc.RpcError, *, request_id: str) -> RouterError:
    """`from_status` for a failed grpc call (use as `raise from_rpc_error(e, ...) from e`)."""
    call_error = rpc_errors.from_rpc_error(error)
    return from_status(call_error.code, str(call_error), request_id=request_id)


def incomplete_stream(request_id: str) -> RouterError:
    """The router closed a Generate stream without a finish reason: a broken contract."""
    return RouterError(
        f"the generation ended without a finish reason (request id {request_id})",
        status=502,
        type="server_error",
        code="bad_gateway",
    )


def no_router(request_id: str) -> ApiError:
    """No cluster that takes requests has a router the edge knows of (discovery found none)."""
    return ApiError(
        f"no router is available; retry later (request id {request_id})",
        status=503,
        type="server_error",
        code="service_unavailable",
    )


def all_cordoned(request_id: str) -> ApiError:
    """Every cluster the edge fronts is cordoned: none takes new requests."""
    return ApiError(
        f"every cluster is cordoned and takes no new requests; retry later "
        f"(request id {request_id})",
        status=503,
        type="server_error",
        code="service_unavailable",
    )


def aborted(request_id: str) -> RouterError:
    """The router finished a request with FINISH_REASON_ABORT: the mesh gave up on it."""
    return RouterError(
        f"the generation was aborted by the server; retry (request id {request_id})",
        status=503,
        type="server_error",
        code="aborted",
    )
