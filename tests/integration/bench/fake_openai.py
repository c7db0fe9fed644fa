"""A tiny OpenAI-compatible completions server, served by uvicorn on 127.0.0.1 in a thread.

`POST /v1/completions` (streaming only) answers `max_tokens` tokens, `tokens_per_chunk` per SSE
chunk, `token_delay_s` apart, then a finish chunk, the usage chunk and `[DONE]`. Its prefix
cache is the longest common prefix with any earlier prompt, reported as
`prompt_tokens_details.cached_tokens`. A model other than `MODEL` is a 404 with an OpenAI error
body; with `hang` set, requests never answer (`requested` is set when one arrives).

The socket listens before the server thread starts, so clients can connect at once: no waiting
for the server to come up.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "fake-model"


def sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class FakeOpenAI:
    token_delay_s: float = 0.002
    tokens_per_chunk: int = 1
    hang: bool = False
    bodies: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    requested: threading.Event = field(default_factory=threading.Event)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
            ]
        )

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        earlier = [b["prompt"] for b in self.bodies]
        self.bodies.append(body)
        self.requested.set()
        if body["model"] != MODEL:
            error = {"message": f"The model `{body['model']}` does not exist.", "code": 404}
            return JSONResponse({"error": error}, status_code=404)
        prompt: list[int] = body["prompt"]
        cached = max((common_prefix(prompt, e) for e in earlier), default=0)
        events = self._events(len(prompt), cached, body["max_tokens"])
        return StreamingResponse(events, media_type="text/event-stream")

    async def _events(
        self, prompt_tokens: int, cached: int, max_tokens: int
    ) -> AsyncIterator[bytes]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hang:
                await asyncio.Event().wait()
            for start in range(0, max_tokens, self.tokens_per_chunk):
                await asyncio.sleep(self.token_delay_s)
                text = "".join(
                    f" t{i}" for i in range(start, min(start + self.tokens_per_chunk, max_tokens))
                )
                yield sse(
                    {
                        "object": "text_completion",
                        "choices": [{"index": 0, "text": text, "finish_reason": None}],
                        "usage": None,
                    }
                )
            yield sse(
                {
                    "object": "text_completion",
                    "choices": [{"index": 0, "text": "", "finish_reason": "length"}],
                    "usage": None,
                }
            )
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": max_tokens,
                "total_tokens": prompt_tokens + max_tokens,
                "prompt_tokens_details": {"cached_tokens": cached},
            }
            yield sse({"object": "text_completion", "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"
        finally:
            self.in_flight -= 1


@contextmanager
def serve_in_thread(fake: FakeOpenAI) -> Iterator[str]:
    """Serve `fake` on 127.0.0.1; yields its base URL; stops the server on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = uvicorn.Config(fake.app(), log_config=None, access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.force_exit = True  # do not wait for hanging streams
        thread.join(timeout=10)
        sock.close()
