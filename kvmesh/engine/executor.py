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


class StepHandle(Protocol):
    """A step queued on the device by `AsyncModelExecutor.launch`."""

    def result(self) -> list[Sampled]:
        """Wait for the step; what it sampled, in the order of its sampling sequences."""
        ...

    def fence(self) -> None:
        """Wait until the device is done with the step (its KV writes), reading nothing."""
        ...


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


class Exporter(Protocol):
    """Where exports go when they leave in another layout than the cache's (the torch engine's
    `ExportPool`): the core pins no cache block for them, and releases theirs here."""

    @property
    def layout_fingerprint(self) -> str:
        """The exports' layout, which their handles carry."""
        ...

    def export(self, block_ids: Seq[int], num_tokens: int) -> list[int]:
        """Copy (converting) the blocks out; the export's block ids. OverloadedError if full."""
        ...

    def release(self, block_ids: Seq[int]) -> None: ...

    def is_whole(self) -> bool: ...


class AsyncModelExecutor(ModelExecutor, Protocol):
    """An executor that can queue a step and return before it has run (async scheduling).

    A sequence's last token may then be `PENDING` (`kvmesh.engine.sequence`): sampled by the
    previous launch and not yet read by the host. The executor feeds that launch's sample,
    still on the device, to the step as the token's input.
    """

    launches_ahead: bool
    """Whether async scheduling pays here (a GPU that runs while the host prepares)."""

    def launch(self, chunks: list[ScheduledChunk]) -> StepHandle: ...
