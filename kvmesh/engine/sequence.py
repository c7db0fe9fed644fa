"""A request as the scheduler sees it: its tokens, how many are computed, and its blocks.

With async scheduling (`kvmesh.engine.core`) a step is scheduled before the host has read the
previous step's tokens: a sampled token the host has not read yet sits at the end of
`token_ids` as `PENDING`, and the executor feeds the device's copy to the next step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from kvmesh.kv.block_pool import BlockId
from kvmesh.kv.hashing import BlockHash, hash_blocks
from kvmesh.sampling import SamplingParams
from kvmesh.text.detokenizer import IncrementalDetokenizer
from kvmesh.types import FinishReason

_NO_ROOT = BlockHash(0)  # the engine sets a sequence's root when it makes it

PENDING = -1
"""A token sampled on the device whose value the host has not read yet."""


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
    # The parent of its first block: the model and the request's cache salt (kv/hashing.py).
    root: BlockHash = _NO_ROOT
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
    # Trailing PENDING tokens (0, 1 or, between a launch and the previous step's read, 2).
    num_pending: int = 0
    # The pending token ends the sequence whatever its value (max_tokens, the context limit, a
    # prefill-only request's first token): nothing more is scheduled for it.
    ends_at_pending: bool = False
    # The drafter's state for this sequence (speculative decoding; `kvmesh.engine.drafts`).
    draft_index: object | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens the host has read (pending ones not counted)."""
        return len(self.token_ids) - self.num_pending - self.num_prompt_tokens

    @property
    def num_resolved_tokens(self) -> int:
        return len(self.token_ids) - self.num_pending

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than the last sampled token is still to run (a prompt, or a recompute)."""
        return self.num_uncomputed_tokens > 1

    def extend_hashes(self, block_size: int) -> None:
        """Hash the full blocks of known tokens not hashed yet (never a PENDING one)."""
        if self.num_resolved_tokens // block_size <= len(self.block_hashes):
            return
        parent = self.block_hashes[-1] if self.block_hashes else self.root
        tokens = self.token_ids[: self.num_resolved_tokens] if self.num_pending else self.token_ids
        self.block_hashes += hash_blocks(
            tokens, block_size, parent, start_block=len(self.block_hashes)
        )

    def resolve(self, token_id: int) -> None:
        """The host has read the oldest pending token."""
        self.token_ids[len(self.token_ids) - self.num_pending] = token_id
        self.num_pending -= 1

    def drop_pending(self) -> None:
        """The sequence ended: tokens sampled after its last one are discarded."""
        if self.num_pending:
            del self.token_ids[-self.num_pending :]
            self.num_pending = 0
        self.num_computed_tokens = min(self.num_computed_tokens, len(self.token_ids))

    def reset_for_recompute(self) -> None:
        """After preemption: blocks gone, every token must be computed again."""
        self.block_ids = []
        self.num_computed_tokens = 0
        self.num_registered_blocks = 0
        self.num_preemptions += 1
        self.state = SeqState.WAITING
