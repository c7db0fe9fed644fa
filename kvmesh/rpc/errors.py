"""The one mapping between gRPC status codes and kvmesh's exceptions.

Servers: `status_of(exc)` turns any kvmesh exception into the status code the contract
promises (the server interceptor applies it to every handler). Clients: `from_rpc_error(e)`
turns a failed call into an `RpcCallError` subclass named after its status.

    RpcCallError                      a call failed with a non-OK status
    ├── InvalidArgumentError          INVALID_ARGUMENT    bad input; do not retry
    ├── NotFoundError                 NOT_FOUND
    ├── FailedPreconditionError       FAILED_PRECONDITION stale handle, expired lease
    ├── ResourceExhaustedError        RESOURCE_EXHAUSTED  shed load; retry elsewhere or later
    ├── UnavailableError              UNAVAILABLE         retryable
    ├── DeadlineExceededError         DEADLINE_EXCEEDED
    ├── CancelledError                CANCELLED
    ├── UnauthenticatedError          UNAUTHENTICATED
    ├── PermissionDeniedError         PERMISSION_DENIED
    └── InternalError                 anything else
"""

from __future__ import annotations

import functools

import grpc


class AuthenticationError(Exception):
    """Raised by an authenticator: the caller is not who it must be."""


class AuthorizationError(Exception):
    """The caller is known but may not call this method."""


@functools.cache
def _status_table() -> tuple[tuple[type[BaseException], grpc.StatusCode], ...]:
    """Most specific first: the first matching class decides.

    Imported on first use, so that clients of kvmesh.rpc (the edge) do not load the engine.
    """
    from kvmesh.engine import errors as engine
    from kvmesh.kv import errors as kv

    return (
        (engine.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
        (kv.InvalidTokenError, grpc.StatusCode.INVALID_ARGUMENT),
        (engine.ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
        (engine.ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
        (engine.UnknownRequestError, grpc.StatusCode.FAILED_PRECONDITION),
        (kv.LayoutMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
        (engine.EngineOverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (kv.NoFreeBlocksError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (engine.EngineStoppedError, grpc.StatusCode.UNAVAILABLE),
        (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
        (AuthorizationError, grpc.StatusCode.PERMISSION_DENIED),
        (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    )


def status_of(exc: BaseException) -> grpc.StatusCode | None:
    """The status code for a kvmesh exception; None for an unexpected one (a bug: INTERNAL)."""
    if isinstance(exc, RpcCallError):  # a downstream call failed: pass its status on
        return exc.code
    for cls, code in _status_table():
        if isinstance(exc, cls):
            return code
    return None


class RpcCallError(Exception):
    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def retryable(self) -> bool:
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class InvalidArgumentError(RpcCallError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(RpcCallError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(RpcCallError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(RpcCallError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(RpcCallError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(RpcCallError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(RpcCallError):
    code = grpc.StatusCode.CANCELLED


class UnauthenticatedError(RpcCallError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(RpcCallError):
    code = grpc.StatusCode.PERMISSION_DENIED


class InternalError(RpcCallError):
    code = grpc.StatusCode.INTERNAL


_CLIENT_ERRORS: dict[grpc.StatusCode, type[RpcCallError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        UnauthenticatedError,
        PermissionDeniedError,
        InternalError,
    )
}


def from_rpc_error(error: grpc.RpcError) -> RpcCallError:
    """The kvmesh exception for a failed call (use as `raise from_rpc_error(e) from e`)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    cls = _CLIENT_ERRORS.get(code, InternalError)
    return cls(details or code.name, code=code)
