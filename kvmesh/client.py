"""An async client of the mesh's `Generation` API, for backend services.

    async with MeshClient("127.0.0.1:50051") as client:
        async for chunk in client.generate(chat=[{"role": "user", "content": "Hi"}], max_tokens=32):
            print(chunk.text, end="")

`generate` is an async iterator: leaving it early (break, an exception, task cancellation)
cancels the request in the mesh. `timeout_s` becomes the call's gRPC deadline. Failures raise
`kvmesh.rpc.errors.RpcCallError` subclasses (`InvalidArgumentError` for bad input,
`UnavailableError` when no worker can serve, and so on).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from kvmesh.api.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from kvmesh.rpc import REQUEST_ID_KEY, open_channel
from kvmesh.rpc.errors import from_rpc_error

_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None  # "stop", "length", "abort"; None until the last chunk
    usage: Usage | None  # on the last chunk


@dataclass(slots=True)
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None


class MeshClient:
    def __init__(self, target: str, *, model: str = "") -> None:
        self._channel = open_channel(target)
        self._stub: generation_pb2_grpc.GenerationAsyncStub = generation_pb2_grpc.GenerationStub(
            self._channel
        )
        self._model = model

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def models(self) -> list[generation_pb2.ModelInfo]:
        try:
            response = await self._stub.ListModels(generation_pb2.ListModelsRequest())
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from e
        return list(response.models)

    async def generate(
        self,
        *,
        chat: Sequence[Mapping[str, str]] | None = None,
        text: str | None = None,
        token_ids: Sequence[int] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> AsyncIterator[Chunk]:
        request = generation_pb2.GenerateRequest(
            request_id=request_id, model=self._model, return_token_ids=True
        )
        given = [x is not None for x in (chat, text, token_ids)]
        if sum(given) != 1:
            raise ValueError("give exactly one of chat, text or token_ids")
        if chat is not None:
            request.chat.messages.extend(
                generation_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in chat
            )
        elif text is not None:
            request.text = text
        else:
            request.token_ids.ids.extend(token_ids or ())
        sampling = request.sampling
        for name, value in (
            ("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
            ("top_k", top_k), ("seed", seed),
        ):  # fmt: skip
            if value is not None:
                setattr(sampling, name, value)
        sampling.stop.extend(stop)
        sampling.ignore_eos = ignore_eos
        metadata = ((REQUEST_ID_KEY, request_id),) if request_id else None
        call = self._stub.Generate(request, timeout=timeout_s, metadata=metadata)
        try:
            async for response in call:
                usage = None
                if response.HasField("usage"):
                    u = response.usage
                    usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)
                yield Chunk(
                    text=response.text,
                    token_ids=tuple(response.token_ids),
                    finish_reason=_FINISH.get(response.finish_reason),
                    usage=usage,
                )
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from e
        finally:
            call.cancel()

    async def complete(self, **kwargs: object) -> Completion:
        """`generate`, collected into one result."""
        result = Completion()
        async for chunk in self.generate(**kwargs):  # type: ignore[arg-type]
            result.text += chunk.text
            result.token_ids += chunk.token_ids
            result.finish_reason = chunk.finish_reason or result.finish_reason
            result.usage = chunk.usage or result.usage
        return result
