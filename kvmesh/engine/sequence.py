"""A request as the scheduler sees it: its tokens, how many are computed, and its blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from kvmesh.kv.block_pool import BlockId
from kvmesh.kv.hashing import BlockHash, hash_blocks
from kvmesh.sampling import SamplingParams
from kvmesh.text.detokenizer import IncrementalDetokenizer
from kvmesh.types import FinishReason


class SeqKind(str, Enum):
    GENERATE = "generate"  # prefill and decode here
    PREFILL_ONLY = "prefill_only"  # stop after the first token and export the KV
    IMPORTED = "imported"  # prompt KV written by another engine; decode here


class SeqState(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingParams
    sampler: Any  # the executor's per-request sampling state
    kind: SeqKind = SeqKind.GENERATE
    detokenizer: IncrementalDetokenizer | None = None
    state: SeqState = SeqState.WAITING
    block_ids: list[BlockId] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Hashes of the full blocks of token_ids, extended as tokens arrive.
    block_hashes: list[BlockHash] = field(default_factory=list)
    # Leading blocks registered in the prefix cache by this sequence.
    num_registered_blocks: int = 0
    num_cached_tokens: int = 0  # prompt tokens this engine did not compute
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than the last sampled token is still to run (a prompt, or a recompute)."""
        return self.num_uncomputed_tokens > 1

    def extend_hashes(self, block_size: int, root: BlockHash) -> None:
        parent = self.block_hashes[-1] if self.block_hashes else root
        self.block_hashes += hash_blocks(
            self.token_ids, block_size, parent, start_block=len(self.block_hashes)
        )

    def reset_for_recompute(self) -> None:
        """After preemption: blocks gone, every token must be computed again."""
        self.block_ids = []
        self.num_computed_tokens = 0
        self.num_registered_blocks = 0
        self.num_preemptions += 1
        self.state = SeqState.WAITING
