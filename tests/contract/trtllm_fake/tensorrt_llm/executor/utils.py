"""Where TensorRT-LLM 1.0 keeps `RequestError`: a request the executor failed."""

from __future__ import annotations


class RequestError(RuntimeError):
    """Raised from a request's result when the executor reports an error for it."""
