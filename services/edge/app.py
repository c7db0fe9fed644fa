"""The edge's HTTP application: `create_app(config, clusters)`.

    POST /v1/chat/completions   chat, streamed (SSE) or not        -> Generation.Generate
    POST /v1/completions        text or token ids, streamed or not -> Generation.Generate
    GET  /v1/models             the first answering router's models -> Generation.ListModels
    GET  /v1/models/{model}     one of them, or 404
    GET  /health                200 only when some cluster that takes requests can serve one,
                                else 503 and why
    GET  /metrics               Prometheus text of this process's registry
    GET  /openapi.json          the OpenAPI 3.1 document of all of these (`openapi.py`)

Every error, including unknown routes and methods, is answered in OpenAI's error shape.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvmesh.api.v1 import generation_pb2
from services.edge.args import EdgeConfig
from services.edge.auth import ApiKeys, AuthenticationError, RateLimitError
from services.edge.clusters import ClusterSet
from services.edge.errors import ApiError, ClientDisconnectedError
from services.edge.generation import GenerationEndpoints, internal_error, log_api_error
from services.edge.middleware import CLIENT_CLOSED_STATUS, RequestContextMiddleware
from services.edge.openapi import openapi_document

log = structlog.get_logger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]


def create_app(config: EdgeConfig, clusters: ClusterSet) -> Starlette:
    generation = GenerationEndpoints(config, clusters)
    info = _InfoEndpoints(clusters)
    keys = (
        ApiKeys.load(config.api_key_file, rps=config.rate_limit_rps, tpm=config.rate_limit_tpm)
        if config.api_key_file is not None
        else None
    )

    def api(endpoint: Endpoint) -> Endpoint:  # /v1: an API key when the edge has keys
        return _answering(_keyed(endpoint, keys) if keys is not None else endpoint)

    routes = [
        Route("/v1/chat/completions", api(generation.chat_completions), methods=["POST"]),
        Route("/v1/completions", api(generation.completions), methods=["POST"]),
        Route("/v1/models", api(info.list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", api(info.get_model), methods=["GET"]),
        Route("/health", _answering(info.health), methods=["GET"]),
        Route("/metrics", _answering(info.metrics), methods=["GET"]),
        Route("/openapi.json", _answering(_document(keys is not None)), methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(RequestContextMiddleware, routes=routes)],
        exception_handlers={HTTPException: _http_exception},
    )


def _document(keyed: bool) -> Endpoint:
    document = openapi_document(keyed=keyed)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    return openapi


def _keyed(endpoint: Endpoint, keys: ApiKeys) -> Endpoint:
    """`endpoint` behind an API key: 401 without a valid one, 429 past its limits. The key's
    tenant and the charge for its tokens go with the request (`request.state`)."""

    async def keyed(request: Request) -> Response:
        key = keys.authenticate(request.headers.get("authorization"))
        keys.admit(key)
        request.state.tenant = key.tenant
        request.state.charge = lambda tokens: keys.charge(key, tokens)
        return await endpoint(request)

    return keyed


def _answering(endpoint: Endpoint) -> Endpoint:
    """`endpoint`, with every failure turned into an answer (an OpenAI error body)."""

    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as e:
            log_api_error(e)
            return error_response(e, _headers_of(e))
        except ClientDisconnectedError:
            log.info("client left before its answer; generation cancelled")
            return Response(status_code=CLIENT_CLOSED_STATUS)
        except Exception:
            log.exception("unexpected error")
            return error_response(internal_error(request.state.request_id))

    return answer


def _headers_of(error: ApiError) -> dict[str, str] | None:
    if isinstance(error, AuthenticationError):
        return {"WWW-Authenticate": 'Bearer realm="kvmesh"'}
    if isinstance(error, RateLimitError):
        return {"Retry-After": str(error.retry_after_s)}
    return None


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405, in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    error = ApiError(
        exc.detail,
        status=exc.status_code,
        type="invalid_request_error",
        code="not_found" if exc.status_code == 404 else "method_not_allowed",
    )
    return error_response(error, headers=dict(exc.headers or {}))


class _InfoEndpoints:
    def __init__(self, clusters: ClusterSet) -> None:
        self._clusters = clusters
        self._created = int(time.time())  # OpenAI's model cards have one; the router has none

    async def list_models(self, request: Request) -> Response:
        models = await self._clusters.list_models(request_id=request.state.request_id)
        return JSONResponse({"object": "list", "data": [self._card(m) for m in models]})

    async def get_model(self, request: Request) -> Response:
        wanted = request.path_params["model"]
        for model in await self._clusters.list_models(request_id=request.state.request_id):
            if model.id == wanted:
                return JSONResponse(self._card(model))
        raise ApiError(
            f"The model '{wanted}' does not exist",
            status=404,
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )

    def _card(self, model: generation_pb2.ModelInfo) -> dict[str, Any]:
        return {
            "id": model.id,
            "object": "model",
            "created": self._created,
            "owned_by": "kvmesh",
            "max_model_len": model.max_model_len,
        }

    async def health(self, request: Request) -> Response:
        reason = await self._clusters.unready_reason(request_id=request.state.request_id)
        if reason is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(REGISTRY), headers={"content-type": CONTENT_TYPE_LATEST})
