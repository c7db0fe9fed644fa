"""kvmesh's one error tree. Each class carries the gRPC status the API contract promises for it,
so a server maps any of them with `exc.status` (`kvmesh.rpc.errors.status_of`) and no table.

Torch-free and at the bottom of the stack: every service, the router and the edge included,
raises and catches these without loading an engine.

    KvmeshError                         INTERNAL            base; a bug if it escapes unmapped
    ├── InvalidRequestError (ValueError) INVALID_ARGUMENT    bad input: the message says what
    ├── UnknownRequestError (KeyError)   FAILED_PRECONDITION no such request, export or import
    ├── OverloadedError                  RESOURCE_EXHAUSTED  no capacity now; retry elsewhere
    ├── StoppedError                     UNAVAILABLE         not running (yet, or any more)
    ├── AuthenticationError              UNAUTHENTICATED     the caller is not who it must be
    ├── AuthorizationError               PERMISSION_DENIED   the caller may not call this
    ├── ModelLoadError                   FAILED_PRECONDITION the model cannot be loaded
    │   └── ModelNotFoundError           NOT_FOUND           the model path or name is unknown
    ├── EngineError                      INTERNAL            an engine failed (a step raised)
    ├── KvError  (kvmesh.kv.errors)      KV blocks, layouts, transfers
    └── RpcCallError (kvmesh.rpc.errors) a call to another service failed: its status passes on
"""

from __future__ import annotations

import grpc


class KvmeshError(Exception):
    """Base of every error kvmesh raises on purpose."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequestError(KvmeshError, ValueError):
    """The request cannot be served as given."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class UnknownRequestError(KvmeshError, KeyError):
    """No request, export or import reservation with that id (finished, expired or never made)."""

    status = grpc.StatusCode.FAILED_PRECONDITION

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "unknown request"


class OverloadedError(KvmeshError):
    """No capacity for this request right now; retry elsewhere or later."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class StoppedError(KvmeshError):
    """The component is not running: still warming up, or shut down."""

    status = grpc.StatusCode.UNAVAILABLE


class AuthenticationError(KvmeshError):
    """Raised by an authenticator: the caller is not who it must be."""

    status = grpc.StatusCode.UNAUTHENTICATED


class AuthorizationError(KvmeshError):
    """The caller is known but may not call this method."""

    status = grpc.StatusCode.PERMISSION_DENIED


class ModelLoadError(KvmeshError):
    """The model cannot be loaded (unsupported architecture, broken files)."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model path or name does not exist."""

    status = grpc.StatusCode.NOT_FOUND


class EngineError(KvmeshError):
    """An engine failed in a way the request did not cause (a step raised, the loop died)."""
