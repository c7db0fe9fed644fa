import grpc
import pytest

from kvmesh import errors
from kvmesh.errors import AuthenticationError
from kvmesh.kv import errors as kv
from kvmesh.rpc.auth import TokenAuthenticator, bearer
from kvmesh.rpc.channels import IDEMPOTENT_METHODS, service_config
from kvmesh.rpc.errors import (
    FailedPreconditionError,
    InternalError,
    ResourceExhaustedError,
    UnavailableError,
    from_rpc_error,
    status_of,
)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidRequestError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (kv.InvalidTokenError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ModelNotFoundError("x"), grpc.StatusCode.NOT_FOUND),
        (errors.ModelLoadError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.UnknownRequestError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (kv.LayoutMismatchError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.OverloadedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.StoppedError("x"), grpc.StatusCode.UNAVAILABLE),
        (AuthenticationError("x"), grpc.StatusCode.UNAUTHENTICATED),
        (UnavailableError("downstream"), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_server_side_mapping(exc: Exception, code: grpc.StatusCode) -> None:
    assert status_of(exc) is code


def test_unexpected_exceptions_have_no_status() -> None:
    assert status_of(RuntimeError("bug")) is None


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_client_side_mapping() -> None:
    error = from_rpc_error(_Failed(grpc.StatusCode.FAILED_PRECONDITION, "lease expired"))
    assert isinstance(error, FailedPreconditionError)
    assert str(error) == "lease expired"
    assert not error.retryable
    assert from_rpc_error(_Failed(grpc.StatusCode.UNAVAILABLE, "")).retryable
    assert isinstance(
        from_rpc_error(_Failed(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")), ResourceExhaustedError
    )
    assert isinstance(from_rpc_error(_Failed(grpc.StatusCode.DATA_LOSS, "?")), InternalError)


def test_token_authenticator() -> None:
    auth = TokenAuthenticator("t0k", ["/kvmesh.v1.ControlPlane/"])
    auth.authenticate("/kvmesh.v1.Worker/GetInfo", {})
    auth.authenticate("/kvmesh.v1.ControlPlane/Scale", dict(bearer("t0k")))
    for metadata in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic t0k"}):
        with pytest.raises(AuthenticationError):
            auth.authenticate("/kvmesh.v1.ControlPlane/Scale", metadata)
    with pytest.raises(ValueError, match="empty"):
        TokenAuthenticator("", [])


def test_retry_policy_covers_only_idempotent_methods() -> None:
    import json

    config = json.loads(service_config(wait_for_ready=True, idempotent=IDEMPOTENT_METHODS))
    retried, rest = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in retried["name"]}
    assert ("kvmesh.v1.Worker", "GetInfo") in names
    assert all(m not in {"Generate", "Prefill", "Decode"} for _, m in names)
    assert retried["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "retryPolicy" not in rest
