"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget (`max_num_batched_tokens`). Running sequences go first — those
decoding (one token each, so inter-token latency stays steady), then those part-way through a
prompt, which take what budget is left as a chunk. Waiting sequences are then admitted in
arrival order while budget, sequence slots and blocks allow; an admitted sequence first reuses
the longest cached prefix of its tokens.

When a running sequence needs a block and none is free, the most recently admitted sequence is
preempted: its blocks are released and it goes back to the front of the queue to be recomputed
(usually from the prefix cache). This cannot deadlock: the engine refuses any request that
could not fit in the pool alone, so the oldest sequence can always make progress by preempting
the others.

With async scheduling, a sequence whose pending token (sampled, not yet read) is known to be its
last is neither scheduled nor preempted: it ends, and frees its blocks, once that token is read.

With speculative decoding (a `drafter`), a decoding sequence's chunk is its last token plus up to
k draft tokens, all verified in one forward pass. Drafts are added once everything else is
scheduled and take only what is spare, so they never change what else runs: the budget left,
room below max_tokens and the context limit (a verify step emits up to k + 1 tokens), and free
blocks; none in a step that had to preempt. After the step the core rolls back what was
rejected (`release_blocks_past_computed`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvmesh.engine.drafts import Drafter
from kvmesh.engine.sequence import SeqKind, SeqState, Sequence
from kvmesh.kv.block_pool import BlockPool
from kvmesh.kv.hashing import BlockHash


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # drafts included
    # Tokens guessed to follow the sequence's last token (speculative decoding): the chunk is
    # that token then these, and the step samples at each of its positions to verify them.
    draft_token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]
    num_prefix_hit_tokens: int = 0  # tokens admitted sequences found in the prefix cache

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        *,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        drafter: Drafter | None = None,
        max_model_len: int | None = None,
    ) -> None:
        self.pool = pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.drafter = drafter
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._hit_tokens = 0
        self.num_deferred = 0  # admissions put off a step for a prefix being computed

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence, *, front: bool = False) -> None:
        seq.state = SeqState.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and release its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.release_blocks(seq)
        seq.state = SeqState.FINISHED

    def release_blocks(self, seq: Sequence) -> None:
        self.pool.release(seq.block_ids)
        seq.block_ids = []

    def release_blocks_past_computed(self, seq: Sequence) -> None:
        """After a verify step: free the blocks that held only rejected drafts (never cached:
        a block is cached once full of computed, accepted tokens)."""
        keep = self._blocks_for(seq.num_computed_tokens)
        if len(seq.block_ids) > keep:
            self.pool.release(seq.block_ids[keep:])
            del seq.block_ids[keep:]

    def schedule(self) -> SchedulerOutput:
        scheduled: dict[Sequence, int] = {}
        drafts: dict[Sequence, list[int]] = {}
        preempted: list[Sequence] = []
        self._hit_tokens = 0

        def budget() -> int:
            return self.max_num_batched_tokens - sum(scheduled.values())

        # Decoding sequences first, then prompts in progress; each group in admission order.
        for seq in sorted(self.running, key=lambda s: s.is_prefilling):
            if seq.state is not SeqState.RUNNING or seq.ends_at_pending:
                continue  # preempted earlier in this loop, or ends with its pending token
            num_tokens = min(seq.num_uncomputed_tokens, budget())
            if num_tokens == 0:
                break
            if self._grow(seq, num_tokens, scheduled, preempted):
                scheduled[seq] = num_tokens

        # Admitting after a preemption would only thrash: wait for blocks to come back.
        # A prompt whose next uncached block another prompt is computing right now waits a step
        # (keeping its place) and then finds it cached, instead of computing it a second time.
        in_flight = self._blocks_in_flight()
        deferred: list[Sequence] = []
        while self.waiting and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._waits_for(seq, in_flight):
                deferred.append(self.waiting.popleft())
                continue
            num_tokens = self._admit(seq, budget())
            if num_tokens == 0:
                break
            self.waiting.popleft()
            self.running.append(seq)
            seq.state = SeqState.RUNNING
            scheduled[seq] = num_tokens
            in_flight.update(self._uncomputed_blocks(seq))
        self.waiting.extendleft(reversed(deferred))
        self.num_deferred += len(deferred)

        if self.drafter is not None and not preempted:
            for seq, num_tokens in list(scheduled.items()):  # decoding ones first, oldest first
                guess = self._draft(seq, budget()) if num_tokens == 1 else []
                if guess:
                    seq.block_ids += self.pool.allocate(self._blocks_needed(seq, 1 + len(guess)))
                    scheduled[seq] += len(guess)
                    drafts[seq] = guess

        chunks = [
            ScheduledChunk(seq, n, tuple(drafts.get(seq, ()))) for seq, n in scheduled.items()
        ]
        return SchedulerOutput(chunks, preempted, self._hit_tokens)

    def _draft(self, seq: Sequence, spare_tokens: int) -> list[int]:
        """Draft tokens for a decoding sequence: as many as the drafter guesses, within the
        spare budget, max_tokens and the context limit (a verify step emits up to one more than
        its drafts), and the free blocks."""
        if (
            self.drafter is None
            or seq.num_uncomputed_tokens != 1
            or seq.num_pending
            or seq.kind is SeqKind.PREFILL_ONLY
        ):
            return []
        room = min(spare_tokens, seq.sampling.max_tokens - seq.num_output_tokens - 1)
        if self.max_model_len is not None:
            room = min(room, self.max_model_len - seq.num_tokens - 1)
        if room < 1:
            return []
        guess = self.drafter.propose(seq, room)[:room]
        while guess and self._blocks_needed(seq, 1 + len(guess)) > self.pool.num_free_blocks:
            guess.pop()  # drafts are a bet: they never take a block anyone else needs
        return guess

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return self._blocks_for(seq.num_computed_tokens + num_tokens) - len(seq.block_ids)

    def _blocks_in_flight(self) -> set[BlockHash]:
        """Hashes of the full prompt blocks running sequences have yet to compute."""
        if not self.pool.enable_prefix_cache:
            return set()
        prefilling = (seq for seq in self.running if seq.is_prefilling)
        return {h for seq in prefilling for h in self._uncomputed_blocks(seq)}

    def _uncomputed_blocks(self, seq: Sequence) -> list[BlockHash]:
        return seq.block_hashes[seq.num_computed_tokens // self.block_size :]

    def _waits_for(self, seq: Sequence, in_flight: set[BlockHash]) -> bool:
        """Whether the first block `seq` would compute is being computed by another sequence."""
        if not in_flight or seq.block_ids:
            return False
        seq.extend_hashes(self.block_size)
        usable = (seq.num_tokens - 1) // self.block_size
        first_missing = len(self.pool.lookup(seq.block_hashes[:usable]))
        return first_missing < usable and seq.block_hashes[first_missing] in in_flight

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _grow(
        self,
        seq: Sequence,
        num_tokens: int,
        scheduled: dict[Sequence, int],
        preempted: list[Sequence],
    ) -> bool:
        """Give `seq` blocks for `num_tokens` more, preempting the newest sequences if needed.

        False when `seq` itself had to be preempted.
        """
        needed = self._blocks_needed(seq, num_tokens)
        while needed > self.pool.num_free_blocks:
            # Not one that ends with its pending token: it frees its blocks once that is read.
            victim = next(s for s in reversed(self.running) if s is seq or not s.ends_at_pending)
            self._preempt(victim)
            scheduled.pop(victim, None)
            preempted.append(victim)
            if victim is seq:
                return False
        if needed > 0:
            seq.block_ids += self.pool.allocate(needed)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.release_blocks(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Reserve blocks for the first chunk of a waiting sequence; 0 if it cannot start now."""
        if budget == 0:
            return 0
        hits = []
        if not seq.block_ids:
            seq.extend_hashes(self.block_size)
            # Leave at least the last token to compute: its logits give the next token.
            usable = (seq.num_tokens - 1) // self.block_size
            hits = self.pool.lookup(seq.block_hashes[:usable])
        num_computed = len(hits) * self.block_size if hits else seq.num_computed_tokens
        num_tokens = min(seq.num_tokens - num_computed, budget)
        num_held = len(hits) if hits else len(seq.block_ids)
        needed = self._blocks_for(num_computed + num_tokens) - num_held
        reclaimed = sum(1 for b in hits if self.pool.ref_count(b) == 0)
        if needed > self.pool.num_free_blocks - reclaimed:
            return 0
        if hits:
            self.pool.acquire(hits)
            seq.block_ids = list(hits)
            seq.num_computed_tokens = num_computed
            seq.num_registered_blocks = len(hits)
            self._hit_tokens += num_computed
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_computed
        seq.block_ids += self.pool.allocate(needed)
        return num_tokens
