"""The engine boundary the services program against.

Two ways KV can move between a prefill and a decode engine:

- `TransferMode.MESH` (the torch engine): `prefill` pins blocks and returns their ids in a
  `KvExport`; the decode side's `reserve_import` allocates local blocks, kvmesh's transfer agent
  copies the missing ones (NIXL READ), then `generate_imported` decodes.
- `TransferMode.ENGINE` (e.g. TensorRT-LLM's cache transceiver): the export's `opaque` bytes
  carry the engine's own state; `reserve_import` hands them to the engine, which moves the KV
  itself and returns a plan with nothing left to fill.

Either way the service calls the same three methods in the same order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from kvmesh.engine.types import (
    EngineInfo,
    EngineStats,
    GenerateRequest,
    KvExport,
    KvImportPlan,
    LoadSnapshot,
    PrefillOutput,
    TokenOutput,
)
from kvmesh.kv.events import KvEventLog
from kvmesh.text.tokenizer import Tokenizer


class Engine(Protocol):
    @property
    def info(self) -> EngineInfo: ...

    @property
    def tokenizer(self) -> Tokenizer | None: ...

    @property
    def kv_events(self) -> KvEventLog: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenOutput]:
        """Prefill and decode here, streaming outputs until one is finished.

        Raises InvalidRequestError before streaming for bad input. Closing the iterator early
        cancels the request and frees its blocks.
        """
        ...

    async def prefill(self, request: GenerateRequest) -> PrefillOutput:
        """Compute the prompt, sample the first token, pin the KV for export."""
        ...

    async def release_export(self, request_id: str) -> None:
        """Unpin an export's blocks (the decode side has them, or its lease expired)."""
        ...

    async def reserve_import(self, request: GenerateRequest, export: KvExport) -> KvImportPlan:
        """Reserve local blocks for an exported prompt; say which must be filled."""
        ...

    def generate_imported(
        self, plan: KvImportPlan, first_token_id: int
    ) -> AsyncIterator[TokenOutput]:
        """Decode after the plan's blocks are filled, from the prefill's first token on.

        Streams the tokens after the first one.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Cancel a request, export or import reservation; a no-op for unknown ids."""
        ...

    def load(self) -> LoadSnapshot: ...

    def stats(self) -> EngineStats: ...
