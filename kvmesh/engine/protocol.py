"""The engine boundary: everything the worker runtime and its services use, and nothing more.

An engine is started and stopped; it serves requests (`generate`), prefills for export
(`prefill`, `release_export`), decodes imported KV (`reserve_import`, `generate_imported`),
aborts, reports load and stats, publishes KV events and snapshots of its prefix cache, and says
what it is and can do (`info`: transfer mode, block size, KV dtype, attention backend, layout).

Two ways KV can move between a prefill and a decode engine (`info.transfer_mode`):

- `TransferMode.MESH` (the torch engine): `prefill` pins blocks and returns their ids in a
  `KvExport`; `kv_region()` is the memory kvmesh's NIXL agent registers; the decode side's
  `reserve_import` allocates local blocks, the agent READs the missing ones, then
  `generate_imported` decodes.
- `TransferMode.ENGINE` (the sim engine; TensorRT-LLM's cache transceiver): the export's
  `opaque` bytes carry the engine's own state, which the router passes along in the handle;
  `reserve_import` hands them to the engine, which moves the KV itself and returns a plan with
  nothing left to fill. `kv_region()` is None: no NIXL agent is made.

Either way the services call the same methods in the same order. Engines are found by name in
`kvmesh.engine.registry`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from kvmesh.kv.events import KvEventLog
from kvmesh.kv.hashing import BlockHash
from kvmesh.text.tokenizer import Tokenizer
from kvmesh.types import (
    EngineInfo,
    EngineStats,
    GenerateRequest,
    KvExport,
    KvImportPlan,
    LoadSnapshot,
    PrefillOutput,
    TokenOutput,
)

if TYPE_CHECKING:
    from kvmesh.kv.cache import PagedKvCache


class Engine(Protocol):
    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start serving; returns once warmed up (weights loaded, kernels compiled, graphs)."""
        ...

    async def stop(self) -> None:
        """Stop; every open stream ends with StoppedError."""
        ...

    # -- what it is ----------------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo: ...

    @property
    def tokenizer(self) -> Tokenizer | None: ...

    def kv_region(self) -> PagedKvCache | None:
        """The KV memory NIXL registers (TransferMode.MESH); None when the engine moves its own."""
        ...

    def export_region(self) -> PagedKvCache | None:
        """The blocks an export's ids name, which peers READ: `kv_region()`, or a pool of
        exports in another dtype (`--transfer-dtype`)."""
        ...

    # -- requests ------------------------------------------------------------------------------

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
        """Reserve local blocks for an exported prompt; say which must be filled.

        TransferMode.ENGINE: also move the KV (from `export.opaque`) before returning."""
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

    # -- state ---------------------------------------------------------------------------------

    def load(self) -> LoadSnapshot: ...

    def stats(self) -> EngineStats: ...

    @property
    def kv_events(self) -> KvEventLog:
        """BlockStored / BlockRemoved / AllCleared, in order, for routers' prefix indexes."""
        ...

    async def kv_snapshot(self) -> tuple[list[BlockHash], int]:
        """The prefix cache's hashes and the id of the last event they include."""
        ...

    async def is_idle_and_whole(self) -> bool:
        """Nothing in flight or pinned and every KV block free (for tests and drains)."""
        ...
