"""`POST /v1/chat/completions` and `POST /v1/completions`: check, call the router, answer.

A streamed answer starts only once the router's first message is in: an error before it is an
ordinary HTTP error response; an error after it is a last SSE event `{"error": {...}}` followed by
`data: [DONE]`. A client that leaves cancels the router's call, at any point: while the edge waits
for the first message or a whole non-streamed answer (`unless_disconnected` watches the
connection), and while it streams (starlette cancels the response, `EventStreamResponse` closes
the event generator, and closing cancels the gRPC call). Which cluster's router answers, and the
move to another one when a router refuses or fails, is `clusters.py`'s: it reads as one stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any, TypeVar

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from kvmesh.api.v1 import generation_pb2
from kvmesh.telemetry import metrics
from services.edge import convert, errors
from services.edge.args import EdgeConfig
from services.edge.clusters import ClusterSet, ClusterStream
from services.edge.errors import (
    ApiError,
    ClientDisconnectedError,
    InvalidRequestError,
    RequestTooLargeError,
)
from services.edge.openai_schema import ChatCompletionRequest, CompletionRequest, parse_body

log = structlog.get_logger(__name__)

T = TypeVar("T")


def _log_user(body: ChatCompletionRequest | CompletionRequest) -> None:
    """OpenAI's `user` (the caller's end-user id) goes on every log line of the request."""
    if body.user is not None:
        structlog.contextvars.bind_contextvars(user=body.user)


class GenerationEndpoints:
    def __init__(self, config: EdgeConfig, clusters: ClusterSet) -> None:
        self._config = config
        self._clusters = clusters
        metrics.zero(metrics.EDGE_CANCELLED_GENERATIONS, "/v1/chat/completions", "/v1/completions")

    async def chat_completions(self, request: Request) -> Response:
        raw = await read_json(request, self._config.max_body_bytes, self._config.body_timeout_s)
        body = parse_body(raw, ChatCompletionRequest)
        _log_user(body)
        request_id: str = request.state.request_id
        renderer = convert.ChatRenderer(
            request_id=request_id,
            model=body.model,
            include_usage=body.include_usage,
            logprobs=[] if body.logprobs else None,
        )
        call = convert.chat_request(
            body, request_id=request_id, default_max_tokens=self._config.default_max_tokens
        )
        return await self._answer(request, call, renderer, stream=bool(body.stream))

    async def completions(self, request: Request) -> Response:
        raw = await read_json(request, self._config.max_body_bytes, self._config.body_timeout_s)
        body = parse_body(raw, CompletionRequest)
        _log_user(body)
        request_id: str = request.state.request_id
        renderer = convert.CompletionRenderer(
            request_id=request_id,
            model=body.model,
            include_usage=body.include_usage,
            want_logprobs=body.logprobs is not None,
        )
        call = convert.completion_request(
            body, request_id=request_id, default_max_tokens=self._config.default_max_tokens
        )
        return await self._answer(request, call, renderer, stream=bool(body.stream))

    async def _answer(
        self,
        request: Request,
        call: generation_pb2.GenerateRequest,
        renderer: convert.Renderer,
        *,
        stream: bool,
    ) -> Response:
        call.tenant = getattr(request.state, "tenant", "")  # the API key's: salts the cache
        charge: Callable[[int], None] | None = getattr(request.state, "charge", None)
        generation = self._clusters.generate(call)
        latency = _Latency(renderer.model, request.state.received_at, streaming=stream)
        route = request.scope["path"]
        try:
            if not stream:
                try:
                    await unless_disconnected(request, _collect(generation, renderer, latency))
                finally:
                    _charge(charge, renderer)
                return JSONResponse(renderer.response())
            first = await unless_disconnected(request, generation.next())
            if first is None:
                raise errors.incomplete_stream(generation.request_id)
        except BaseException as e:
            generation.cancel()
            if isinstance(e, ClientDisconnectedError | asyncio.CancelledError):
                metrics.EDGE_CANCELLED_GENERATIONS.labels(route).inc()
            raise
        latency.arrived(generation.last_tokens)
        events = _events(first, generation, renderer, route, latency)

        def close() -> None:
            generation.cancel()
            _charge(charge, renderer)

        return EventStreamResponse(events, on_close=close)


def _charge(charge: Callable[[int], None] | None, renderer: convert.Renderer) -> None:
    """Count what a request used against its API key's tokens per minute."""
    if charge is not None and renderer.usage is not None:
        charge(renderer.usage.prompt_tokens + renderer.usage.completion_tokens)


class _Latency:
    """One generation's latency as the edge's client sees it: TTFT at the router's first
    message, the gap between a stream's tokens (a message of n tokens counts n gaps of a nth of
    its wait; an answer sent whole has none), E2E once it has ended well."""

    def __init__(self, model: str, received_at: float, *, streaming: bool) -> None:
        self._model, self._received_at, self._streaming = model, received_at, streaming
        self._last: float | None = None

    def arrived(self, tokens: int) -> None:
        """A message of the router's arrived, carrying `tokens` tokens."""
        now = time.perf_counter()
        if self._last is None:
            metrics.EDGE_TTFT_SECONDS.labels(self._model).observe(now - self._received_at)
        elif tokens and self._streaming:
            gap, itl = (now - self._last) / tokens, metrics.EDGE_ITL_SECONDS.labels(self._model)
            for _ in range(tokens):
                itl.observe(gap)
        if self._last is None or tokens:
            self._last = now

    def ended(self) -> None:
        elapsed = time.perf_counter() - self._received_at
        metrics.EDGE_E2E_SECONDS.labels(self._model).observe(elapsed)


async def _collect(
    generation: ClusterStream, renderer: convert.Renderer, latency: _Latency
) -> None:
    while (message := await generation.next()) is not None:
        latency.arrived(generation.last_tokens)
        renderer.add(message)
    renderer.check_finished()
    latency.ended()


async def _events(
    first: generation_pb2.GenerateResponse,
    generation: ClusterStream,
    renderer: convert.Renderer,
    route: str,
    latency: _Latency,
) -> AsyncGenerator[bytes, None]:
    finished = False
    try:
        try:
            message: generation_pb2.GenerateResponse | None = first
            while message is not None:
                for chunk in renderer.add(message):
                    yield convert.sse(chunk)
                message = await generation.next()
                if message is not None:
                    latency.arrived(generation.last_tokens)
            renderer.check_finished()
            latency.ended()
            if renderer.include_usage:
                yield convert.sse(renderer.usage_chunk())
        except ApiError as e:
            log_api_error(e, streaming=True)
            yield convert.sse(e.body())
        except Exception:
            log.exception("unexpected error while streaming")
            yield convert.sse(internal_error(generation.request_id).body())
        yield convert.SSE_DONE
        finished = True
    finally:
        generation.cancel()  # nothing left to cancel once the stream has ended
        if not finished:
            metrics.EDGE_CANCELLED_GENERATIONS.labels(route).inc()
            log.info("stream closed before its end; generation cancelled")


class EventStreamResponse(StreamingResponse):
    """Server-sent events whose generator is always closed, then `on_close` run.

    When the client leaves, starlette cancels the streaming task; if that happens while the
    generator waits at a `yield` (the send was in progress), the generator itself is left
    suspended, its `finally` deferred to garbage collection. Closing it here makes the gRPC
    cancellation prompt and certain.
    """

    media_type = "text/event-stream"

    def __init__(
        self, events: AsyncGenerator[bytes, None], *, on_close: Callable[[], None]
    ) -> None:
        super().__init__(events, headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            await self._events.aclose()


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`, or cancel it and raise ClientDisconnectedError if the client leaves first.

    Starlette watches for a disconnect only while a StreamingResponse streams; this covers the
    wait before (the first token, or all of a non-streamed answer).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientDisconnectedError("the client closed the connection")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass  # the body was read already; nothing else arrives but the disconnect


async def read_json(request: Request, max_bytes: int, timeout_s: float = 30.0) -> Any:
    """The body as JSON, at most `max_bytes` of it, arriving within `timeout_s`; 413 beyond
    the size, 408 past the time, 400 if it is not JSON."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise RequestTooLargeError(max_bytes)
    body = bytearray()

    async def receive() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_bytes:
                raise RequestTooLargeError(max_bytes)

    try:
        await asyncio.wait_for(receive(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(
            f"the request body did not arrive within {timeout_s:g} s",
            status=408,
            type="invalid_request_error",
            code="request_timeout",
        ) from None
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise InvalidRequestError(f"the request body is not valid JSON: {e}") from e


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def internal_error(request_id: str) -> ApiError:
    return ApiError(
        f"internal error (request id {request_id})",
        status=500,
        type="server_error",
        code="internal_error",
    )


def log_api_error(error: ApiError, *, streaming: bool = False) -> None:
    emit = log.warning if error.status >= 500 else log.info
    emit(
        "request failed",
        status=error.status,
        error=error.message,
        upstream=error.upstream,
        streaming=streaming,
    )
