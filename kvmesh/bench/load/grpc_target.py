"""kvmesh's router over gRPC: `kvmesh.v1.Generation/Generate`, token ids in and out.

Every message names the token ids it carries (`return_token_ids`), so chunk sizes are exact and
multi-turn sessions resend the real answers. The channel does not wait for readiness: a router
that is down must show up as failed requests, not as latency.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from kvmesh.api.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from kvmesh.bench.load.errors import RequestFailedError, TargetError, TargetUnreachableError
from kvmesh.bench.load.targets import Chunk, Prompt, Usage
from kvmesh.rpc import open_channel

LIST_MODELS_TIMEOUT_S = 10.0


class GrpcTarget:
    def __init__(self, address: str) -> None:
        self.description = f"grpc {address}"
        self._channel = open_channel(address, wait_for_ready=False)
        self._stub: generation_pb2_grpc.GenerationAsyncStub = generation_pb2_grpc.GenerationStub(
            self._channel
        )

    async def list_models(self) -> list[str]:
        try:
            response = await self._stub.ListModels(
                generation_pb2.ListModelsRequest(), timeout=LIST_MODELS_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise TargetUnreachableError(
                    f"cannot reach {self.description}: {e.details()}"
                ) from e
            raise TargetError(f"ListModels: {e.code().name}: {e.details()}") from e
        return [m.id for m in response.models]

    async def generate(
        self, model: str, prompt: Prompt, max_tokens: int
    ) -> AsyncIterator[Chunk | Usage]:
        request = generation_pb2.GenerateRequest(
            model=model,
            sampling=common_pb2.SamplingParams(
                max_tokens=max_tokens, temperature=0, ignore_eos=True
            ),
            return_token_ids=True,
        )
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        call = self._stub.Generate(request)
        finished = False
        try:
            async for response in call:
                if response.token_ids:
                    ids = tuple(response.token_ids)
                    yield Chunk(num_tokens=len(ids), token_ids=ids)
                if response.HasField("usage"):
                    u = response.usage
                    yield Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)
                if response.finish_reason == common_pb2.FINISH_REASON_ABORT:
                    raise RequestFailedError("the router aborted the request")
                if response.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    finished = True
        except grpc.aio.AioRpcError as e:
            raise RequestFailedError(f"gRPC {e.code().name}: {e.details()}") from e
        finally:
            call.cancel()  # a no-op once the stream has ended; stops the router's work if not
        if not finished:
            raise RequestFailedError("the stream ended without a finish reason")

    async def aclose(self) -> None:
        await self._channel.close(None)
