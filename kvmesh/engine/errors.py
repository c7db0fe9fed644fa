"""Errors of `kvmesh.engine`; services map them to gRPC status codes at their edge.

EngineError
├── InvalidRequestError     bad input: the message says what is wrong  (INVALID_ARGUMENT)
├── ModelLoadError          the model cannot be loaded                 (FAILED_PRECONDITION)
│   └── ModelNotFoundError  the model path or name does not exist
├── EngineOverloadedError   no capacity for this request now           (RESOURCE_EXHAUSTED)
├── UnknownRequestError     no such request, export or import          (FAILED_PRECONDITION)
└── EngineStoppedError      the engine has shut down or its loop died  (UNAVAILABLE)
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error raised by kvmesh.engine."""


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be served as given."""


class ModelLoadError(EngineError):
    """The model cannot be loaded (unsupported architecture, broken files)."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model path or name does not exist."""


class EngineOverloadedError(EngineError):
    """The engine has no capacity for this request right now; retry elsewhere or later."""


class UnknownRequestError(EngineError, KeyError):
    """No request, export or import reservation with that id (finished, expired or never made)."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "unknown request"


class EngineStoppedError(EngineError):
    """The engine is not running."""
