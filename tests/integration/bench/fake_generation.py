"""A tiny `kvmesh.v1.Generation` servicer on `RpcServer`: answers token ids and usage.

Each answer is `max_tokens` messages of one token id (1000, 1001, ...); the last message has
finish reason LENGTH and usage whose cached prompt tokens are the longest common prefix with an
earlier prompt. Every request is recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvmesh.api.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from kvmesh.rpc import RpcServer, ServerConfig, ServiceBinding

MODEL = "fake-model"
FIRST_ANSWER_ID = 1000
SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


class FakeGeneration(generation_pb2_grpc.GenerationServicer):
    def __init__(self) -> None:
        self.requests: list[generation_pb2.GenerateRequest] = []

    async def ListModels(
        self, request: generation_pb2.ListModelsRequest, context: Any
    ) -> generation_pb2.ListModelsResponse:
        return generation_pb2.ListModelsResponse(models=[generation_pb2.ModelInfo(id=MODEL)])

    async def Generate(self, request: generation_pb2.GenerateRequest, context: Any) -> Any:
        earlier = [list(r.token_ids.ids) for r in self.requests]
        self.requests.append(request)
        prompt = list(request.token_ids.ids)
        cached = max((_common_prefix(prompt, e) for e in earlier), default=0)
        n = request.sampling.max_tokens
        for i in range(n):
            response = generation_pb2.GenerateResponse(
                token_ids=[FIRST_ANSWER_ID + i], text=f" t{i}"
            )
            if i == n - 1:
                response.finish_reason = common_pb2.FINISH_REASON_LENGTH
                response.usage.CopyFrom(
                    common_pb2.Usage(
                        prompt_tokens=len(prompt), completion_tokens=n, cached_prompt_tokens=cached
                    )
                )
            yield response


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


async def start_fake_generation() -> tuple[FakeGeneration, RpcServer]:
    fake = FakeGeneration()
    binding = ServiceBinding(
        SERVICE, lambda s: generation_pb2_grpc.add_GenerationServicer_to_server(fake, s)
    )
    server = RpcServer([binding], ServerConfig(grace_s=0))
    await server.start()
    await server.set_serving(True)
    return fake, server
