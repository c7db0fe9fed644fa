"""A scripted `kvmesh.v1.Generation`, served by `RpcServer` (so health works as the router's).

`Generate` echoes its input one token per message: the words of a text prompt or of the last
chat message (token id 100 + position), or the ids of a token-id prompt. `max_tokens` caps the
answer (finish LENGTH), otherwise it ends with STOP. Some inputs script other behaviour:

    "hang"                  one message, then nothing until the call is cancelled
    "hang-first"            no message at all until the call is cancelled
    "fail:<CODE>"           fails with status CODE before any message
    "fail-after:<CODE>"     one message, then fails with CODE
    "no-finish"             one message, then ends without a finish reason
    "abort"                 one message, then finishes with FINISH_REASON_ABORT

Rules of the real router that the edge must pass through: temperature < 0 and top_k < 0 are
INVALID_ARGUMENT, a model other than `MODEL` is NOT_FOUND. Every request, its `x-request-id`
metadata and every cancellation are recorded.

As one cluster among several (spillover, failover), like the real router: `resume_token_ids`
skip that many tokens of the echo (they count in usage), token ids are sent when asked for, and
whether `x-kvmesh-spill: 1` came is recorded. Modes, whatever the input:

    saturated               RESOURCE_EXHAUSTED before any message, for calls with the spill key
    unavailable             UNAVAILABLE before any message
    break_after = N         N messages, then UNAVAILABLE (a router that dies mid-stream)
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from kvmesh.api.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from kvmesh.rpc import REQUEST_ID_KEY, RpcServer, ServerConfig, ServiceBinding
from kvmesh.rpc.errors import (
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    RpcCallError,
    UnavailableError,
)
from kvmesh.rpc.spill import wants_spill

MODEL = "fake-model"
GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
FIRST_TOKEN_ID = 100


class FakeRouter(generation_pb2_grpc.GenerationServicer):
    def __init__(self) -> None:
        self.models = [
            generation_pb2.ModelInfo(
                id=MODEL, max_model_len=2048, num_prefill_workers=1, num_decode_workers=1
            )
        ]
        self.reset()

    def reset(self) -> None:
        self.requests: list[generation_pb2.GenerateRequest] = []
        self.request_ids: list[str | None] = []  # x-request-id metadata, per request
        self.spill: list[bool] = []  # whether x-kvmesh-spill: 1 came, per request
        self.saturated = False
        self.unavailable = False
        self.break_after: int | None = None
        self.generating = asyncio.Event()  # set when a Generate call arrives
        self.cancelled = asyncio.Event()  # set when a Generate call is cancelled
        self.num_cancelled = 0

    async def ListModels(
        self, request: generation_pb2.ListModelsRequest, context: Any
    ) -> generation_pb2.ListModelsResponse:
        return generation_pb2.ListModelsResponse(models=self.models)

    async def Generate(self, request: generation_pb2.GenerateRequest, context: Any) -> Any:
        self.requests.append(request)
        metadata = dict(context.invocation_metadata() or ())
        self.request_ids.append(metadata.get(REQUEST_ID_KEY))
        self.spill.append(wants_spill(metadata.items()))
        self.generating.set()
        try:
            async for response in self._script(request):
                yield response
        except asyncio.CancelledError:
            self.num_cancelled += 1
            self.cancelled.set()
            raise

    async def _script(self, request: generation_pb2.GenerateRequest) -> Any:
        if self.saturated and self.spill[-1]:
            raise ResourceExhaustedError("scripted: saturated")
        if self.unavailable:
            raise UnavailableError("scripted: unavailable")
        if request.model != MODEL:
            raise NotFoundError(f"model '{request.model}' is not served")
        sampling = request.sampling
        if sampling.HasField("temperature") and sampling.temperature < 0:
            raise InvalidArgumentError(f"temperature must be >= 0, got {sampling.temperature:g}")
        if sampling.HasField("top_k") and sampling.top_k < 0:
            raise InvalidArgumentError(f"top_k must be >= 0 (0 disables it), got {sampling.top_k}")
        prompt, tokens = _prompt(request)
        if prompt.startswith("fail:"):
            raise RpcCallError(
                "scripted failure", code=grpc.StatusCode[prompt.removeprefix("fail:")]
            )
        if prompt == "hang-first":
            await asyncio.Event().wait()
        if prompt in ("hang", "no-finish", "abort") or prompt.startswith("fail-after:"):
            finish = (
                common_pb2.FINISH_REASON_ABORT
                if prompt == "abort"
                else common_pb2.FINISH_REASON_UNSPECIFIED
            )
            yield generation_pb2.GenerateResponse(text="partial", finish_reason=finish)
            if prompt == "hang":
                await asyncio.Event().wait()
            if prompt.startswith("fail-after:"):
                code = grpc.StatusCode[prompt.removeprefix("fail-after:")]
                raise RpcCallError("scripted failure", code=code)
            return
        limit = sampling.max_tokens if sampling.HasField("max_tokens") else len(tokens)
        answer = tokens[:limit]
        resumed = len(request.resume_token_ids)
        for i, (token_id, text) in enumerate(answer):
            if i < resumed:
                continue  # streamed by another router already
            if self.break_after is not None and i - resumed >= self.break_after:
                raise UnavailableError("scripted: the router went away")
            message = generation_pb2.GenerateResponse(
                request_id=request.request_id,
                text=text if i == 0 else f" {text}",
                logprobs=[_logprob(token_id, i, sampling.top_logprobs)]
                if sampling.logprobs
                else [],
                token_ids=[token_id] if request.return_token_ids else [],
            )
            if i == len(answer) - 1:
                length = limit < len(tokens)
                message.finish_reason = (
                    common_pb2.FINISH_REASON_LENGTH if length else common_pb2.FINISH_REASON_STOP
                )
                message.usage.CopyFrom(
                    common_pb2.Usage(
                        prompt_tokens=len(tokens),
                        completion_tokens=len(answer),
                        cached_prompt_tokens=1,
                    )
                )
            yield message


def _prompt(request: generation_pb2.GenerateRequest) -> tuple[str, list[tuple[int, str]]]:
    """The scripting text, and the (token id, text) pairs to echo."""
    which = request.WhichOneof("input")
    if which == "token_ids":
        ids = list(request.token_ids.ids)
        return "", [(i, str(i)) for i in ids]
    text = request.text if which == "text" else request.chat.messages[-1].content
    words = text.split() or [""]
    return text, [(FIRST_TOKEN_ID + i, w) for i, w in enumerate(words)]


def _logprob(token_id: int, position: int, top: int) -> common_pb2.TokenLogprob:
    logprob = -0.25 * (position + 1)
    return common_pb2.TokenLogprob(
        token_id=token_id,
        logprob=logprob,
        top=[common_pb2.TopLogprob(token_id=token_id + k, logprob=logprob - k) for k in range(top)],
    )


async def start_fake_router() -> tuple[FakeRouter, RpcServer]:
    fake = FakeRouter()
    binding = ServiceBinding(
        GENERATION_SERVICE,
        lambda server: generation_pb2_grpc.add_GenerationServicer_to_server(fake, server),
    )
    server = RpcServer([binding], ServerConfig(grace_s=0))
    await server.start()
    await server.set_serving(True)
    return fake, server
