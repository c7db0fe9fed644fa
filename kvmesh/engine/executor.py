"""What runs the model for `EngineCore`: the torch engine's model runner, or the sim's clock.

The core decides what runs (scheduling, blocks, the prefix cache, exports and imports); an
executor computes it. Everything the core needs from one is here, so the core stays torch-free
and the simulated engine keeps the real bookkeeping with a model that only takes time.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kvmesh.sampling import SamplingParams, TokenLogprob
from kvmesh.types import KvExport

if TYPE_CHECKING:
    from kvmesh.engine.scheduler import ScheduledChunk
    from kvmesh.engine.sequence import Sequence


@dataclass(slots=True)
class Sampled:
    seq: Sequence
    token_id: int
    logprob: TokenLogprob | None


class ModelExecutor(Protocol):
    def make_sampler(self, params: SamplingParams) -> Any:
        """Per-request sampling state (a seeded generator, say), kept on the sequence."""
        ...

    def execute(self, chunks: list[ScheduledChunk]) -> list[Sampled]:
        """Compute the chunks' tokens; sample for sequences whose tokens are all computed."""
        ...

    def warm_up(self) -> None:
        """One-time work before the first request (kernel compilation, CUDA graph capture)."""
        ...

    def export_state(self, export: KvExport) -> bytes:
        """TransferMode.ENGINE: the opaque state a peer engine needs to fetch this export."""
        ...

    async def receive_kv(self, export: KvExport, block_ids: Seq[int]) -> None:
        """TransferMode.ENGINE: fill `block_ids` with the export's KV, from the event loop while
        steps go on. Raises InvalidRequestError for state this executor cannot read."""
        ...
