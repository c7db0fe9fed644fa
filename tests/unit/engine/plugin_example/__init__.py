"""An engine plug-in, as a third-party package would write one (docs/engines.md walks it).

`CountingEngine` is the smallest real engine: kvmesh's `EngineCore` (scheduling, the block
pool and prefix cache, KV events) driven by `AsyncEngine`, over an executor that "computes"
each next token as the previous one plus one (mod the vocabulary). It is registered under the
entry-point group `kvmesh.engines` by a distribution's metadata, exactly as
`[project.entry-points."kvmesh.engines"] counting = "..."` in a pyproject.toml would do; the
tests write that metadata into a temporary directory on sys.path.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from kvmesh.engine.config import EngineConfig
from kvmesh.engine.core import EngineCore
from kvmesh.engine.driver import AsyncEngine
from kvmesh.engine.executor import Sampled
from kvmesh.engine.scheduler import ScheduledChunk
from kvmesh.errors import InvalidRequestError
from kvmesh.sampling import SamplingParams
from kvmesh.types import EngineInfo, KvExport, TransferMode

VOCAB_SIZE = 1000


class CountingExecutor:
    def make_sampler(self, params: SamplingParams) -> None:
        if not params.is_greedy:
            raise InvalidRequestError("the counting engine only counts: use temperature 0")

    def warm_up(self) -> None:
        pass

    def execute(self, chunks: list[ScheduledChunk]) -> list[Sampled]:
        out = []
        for chunk in chunks:
            seq = chunk.seq
            if seq.num_computed_tokens + chunk.num_tokens == seq.num_tokens:  # samples
                out.append(Sampled(seq, (seq.token_ids[-1] + 1) % VOCAB_SIZE, None))
        return out

    def export_state(self, export: KvExport) -> bytes:
        return f"counting:{export.num_tokens}".encode()

    async def receive_kv(self, export: KvExport, block_ids: Seq[int]) -> None:
        if not export.opaque.startswith(b"counting:"):
            raise InvalidRequestError("not a counting engine's KV")


class CountingEngine(AsyncEngine):
    def __init__(self, config: EngineConfig) -> None:
        num_blocks = config.num_blocks or 256
        info = EngineInfo(
            engine="counting",
            model_id=config.model_id or config.model,
            block_size=config.block_size,
            num_blocks=num_blocks,
            layout_fingerprint=f"counting/v1:B{config.block_size}",
            max_model_len=num_blocks * config.block_size,
            vocab_size=VOCAB_SIZE,
            device="cpu",
            dtype="none",
            kv_dtype="none",
            attention_backend="none",
            transfer_mode=TransferMode.ENGINE,  # it moves its own (imaginary) KV
        )
        core = EngineCore(
            config, executor=CountingExecutor(), info=info, tokenizer=None, eos_token_ids=()
        )
        super().__init__(core)
