"""The one mapping between gRPC status codes and kvmesh's exceptions.

Servers: `status_of(exc)` is the status a kvmesh exception carries (`KvmeshError.status`; the
server interceptor applies it to every handler). Clients: `from_rpc_error(e)`
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

import grpc

from kvmesh.errors import KvmeshError


def status_of(exc: BaseException) -> grpc.StatusCode | None:
    """The status code for a kvmesh exception; None for an unexpected one (a bug: INTERNAL)."""
    if isinstance(exc, KvmeshError):  # RpcCallError included: a downstream status passes on
        return exc.status
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return None


class RpcCallError(KvmeshError):
    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.status = self.code  # a downstream status passes on as this error's own

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
