"""An OpenAI-compatible server over HTTP: POST /v1/completions, streamed (SSE).

The request is the one every such server accepts in the same way: `prompt` as token ids (or
text), `max_tokens`, temperature 0, `ignore_eos` (a vLLM extension that our edge and SGLang also
take, so every answer has exactly `max_tokens` tokens), `stream_options.include_usage` for the
token counts, whose `prompt_tokens_details.cached_tokens` is the prefix-cache hit where the
server reports it. The per-request time limit is the runner's; httpx's own timeouts only catch a
connection that never opens.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from kvmesh.bench.load.errors import RequestFailedError, TargetError, TargetUnreachableError
from kvmesh.bench.load.targets import Chunk, Prompt, Usage

CONNECT_TIMEOUT_S = 10.0


class HttpTarget:
    def __init__(self, url: str, *, max_connections: int, api_key: str | None = None) -> None:
        base = url.rstrip("/").removesuffix("/v1")
        self.description = base
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._client = httpx.AsyncClient(
            base_url=base,
            headers=headers,
            timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    async def list_models(self) -> list[str]:
        try:
            response = await self._client.get("/v1/models", timeout=CONNECT_TIMEOUT_S)
        except httpx.TransportError as e:
            raise TargetUnreachableError(f"cannot reach {self.description}: {e!r}") from e
        if response.status_code != 200:
            raise TargetError(f"GET /v1/models: {_error_message(response)}")
        try:
            return [str(m["id"]) for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError) as e:
            raise TargetError(f"GET /v1/models: not an OpenAI model list: {e!r}") from e

    async def generate(
        self, model: str, prompt: Prompt, max_tokens: int
    ) -> AsyncIterator[Chunk | Usage]:
        body = {
            "model": model,
            "prompt": prompt if isinstance(prompt, str) else list(prompt),
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise RequestFailedError(_error_message(response))
                done = False
                async for line in response.aiter_lines():
                    data = line.removeprefix("data:").strip()
                    if not line.startswith("data:") or not data:
                        continue  # comments, keep-alives, blank separators
                    if data == "[DONE]":
                        done = True
                        break
                    for event in _events(_decode(data)):
                        yield event
                if not done:
                    raise RequestFailedError("the stream ended without [DONE]")
        except httpx.HTTPError as e:
            raise RequestFailedError(f"HTTP: {e!r}") from e

    async def aclose(self) -> None:
        await self._client.aclose()


def _decode(data: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError as e:
        raise RequestFailedError(f"an SSE event is not JSON: {data[:200]!r}") from e
    if not isinstance(event, dict):
        raise RequestFailedError(f"an SSE event is not a JSON object: {data[:200]!r}")
    if "error" in event:
        error = event["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise RequestFailedError(f"error event: {message}")
    return event


def _events(event: dict[str, Any]) -> list[Chunk | Usage]:
    out: list[Chunk | Usage] = []
    for choice in event.get("choices") or ():
        if choice.get("text"):
            out.append(Chunk(num_tokens=None))
    usage = event.get("usage")
    if usage:
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
        out.append(
            Usage(
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                cached_tokens=None if cached is None else int(cached),
            )
        )
    return out


def _error_message(response: httpx.Response) -> str:
    """`HTTP 400: <the OpenAI error's message>`, or the start of whatever body came back."""
    try:
        body = response.json()
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else body
    except (ValueError, KeyError, TypeError, AttributeError):
        message = response.text[:200]
    return f"HTTP {response.status_code}: {message}"
