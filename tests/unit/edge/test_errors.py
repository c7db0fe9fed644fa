"""The one mapping from the router's gRPC status to the edge's HTTP answer."""

from __future__ import annotations

import grpc
import pytest

from services.edge.errors import STATUS_TO_HTTP, from_rpc_error, from_status

REQUEST_ID = "req-1"

# code -> (HTTP status, OpenAI type, OpenAI code, param, does the router's message reach the client)
EXPECTED = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None, None, True),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found", "model", True),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        None,
        True,
    ),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "unauthenticated", None, True),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "permission_denied", None, True),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable", None, False),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout", None, False),
    grpc.StatusCode.FAILED_PRECONDITION: (500, "server_error", "internal_error", None, False),
    grpc.StatusCode.CANCELLED: (500, "server_error", "internal_error", None, False),
    grpc.StatusCode.INTERNAL: (500, "server_error", "internal_error", None, False),
    grpc.StatusCode.UNKNOWN: (500, "server_error", "internal_error", None, False),
    grpc.StatusCode.UNIMPLEMENTED: (500, "server_error", "internal_error", None, False),
    grpc.StatusCode.ABORTED: (500, "server_error", "internal_error", None, False),
    grpc.StatusCode.OUT_OF_RANGE: (500, "server_error", "internal_error", None, False),
    grpc.StatusCode.ALREADY_EXISTS: (500, "server_error", "internal_error", None, False),
    grpc.StatusCode.DATA_LOSS: (500, "server_error", "internal_error", None, False),
}


def test_every_status_code_is_covered() -> None:
    assert set(EXPECTED) == set(grpc.StatusCode) - {grpc.StatusCode.OK}
    assert set(STATUS_TO_HTTP) <= set(EXPECTED)


@pytest.mark.parametrize("code", list(EXPECTED), ids=lambda c: c.name)
def test_mapping(code: grpc.StatusCode) -> None:
    status, type_, error_code, param, passes_message = EXPECTED[code]
    error = from_status(code, "the router's words: 10.0.0.7:50051", request_id=REQUEST_ID)
    assert (error.status, error.type, error.code, error.param) == (status, type_, error_code, param)
    assert error.body() == {
        "error": {"message": error.message, "type": type_, "param": param, "code": error_code}
    }
    if passes_message:
        assert error.message == "the router's words: 10.0.0.7:50051"
    else:  # no internal detail leaks; the request id lets an operator find the log line
        assert "10.0.0.7" not in error.message
        assert REQUEST_ID in error.message
    assert error.upstream == f"{code.name}: the router's words: 10.0.0.7:50051"


def test_an_empty_message_gets_a_generic_one() -> None:
    error = from_status(grpc.StatusCode.INVALID_ARGUMENT, "", request_id=REQUEST_ID)
    assert error.status == 400 and REQUEST_ID in error.message


def test_from_a_failed_call() -> None:
    failed = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="model 'x' is not served",
        debug_error_string="",
    )
    error = from_rpc_error(failed, request_id=REQUEST_ID)
    assert (error.status, error.code, error.message) == (
        404,
        "model_not_found",
        "model 'x' is not served",
    )
