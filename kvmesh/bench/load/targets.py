"""The servers a run can measure, behind one interface.

A target turns one prompt into a stream of events: a `Chunk` for every streamed piece that
carries tokens, then the request's `Usage`. The runner times the events; the target only says
what arrived. Failures of one request raise `RequestFailedError` (recorded, the run goes on);
`list_models` raises `TargetUnreachableError` when no connection can be made at all.

- `HttpTarget`: any OpenAI-compatible server (our edge, vLLM, SGLang), POST /v1/completions
  streamed as server-sent events;
- `GrpcTarget`: kvmesh's `Generation` API on the router.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

Prompt = Sequence[int] | str  # token ids, or text where the prompt format is text


@dataclass(frozen=True, slots=True)
class Chunk:
    """A streamed piece of the answer.

    `num_tokens` is None where the protocol does not say (OpenAI streams carry text only); the
    metrics then spread the usage's completion tokens over the chunks.
    """

    num_tokens: int | None
    token_ids: tuple[int, ...] = ()  # the answer's ids, where the server sends them


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None  # None: the server does not report prefix-cache hits


class Target(Protocol):
    description: str  # "http://127.0.0.1:8000" or "grpc 127.0.0.1:50051"

    async def list_models(self) -> list[str]:
        """The models served (also the connectivity check before a run)."""
        ...

    def generate(self, model: str, prompt: Prompt, max_tokens: int) -> AsyncIterator[Chunk | Usage]:
        """Greedy, EOS ignored, exactly `max_tokens` tokens asked for: the load is the plan."""
        ...

    async def aclose(self) -> None: ...


def open_target(
    protocol: str, address: str, *, max_connections: int, api_key: str | None = None
) -> Target:
    if protocol == "grpc":
        from kvmesh.bench.load.grpc_target import GrpcTarget

        return GrpcTarget(address)
    from kvmesh.bench.load.http_target import HttpTarget

    return HttpTarget(address, max_connections=max_connections, api_key=api_key)
