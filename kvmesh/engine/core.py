"""The engine core: synchronous, single-threaded, deterministic given its inputs; torch-free.

It owns the block pool, the prefix cache, the scheduler, exports and import reservations, and
KV events; `step()` has its executor (`kvmesh.engine.executor`) run one step of the batch and
returns what each request produced. The torch engine's executor runs the model
(`TorchCore` in `kvmesh.engine.torch_engine`); the simulated engine's only takes the time a GPU
would (`kvmesh.engine.sim`). `AsyncEngine` drives a core from a thread and adds the async API;
tests drive it directly.

With async scheduling (an executor with `launch`, on a GPU by default) `step()` launches the
step it schedules and then reads the previous one, so the host's work overlaps the device's:
a sampled token not yet read is PENDING in its sequence (`kvmesh.engine.sequence`), and
outputs come one step late. docs/engines.md ("Async scheduling") says what else it changes.

With speculative decoding (`EngineConfig.speculate`) the scheduler gives a decoding sequence
draft tokens (`kvmesh.engine.drafts`), the executor verifies them in the same forward pass, and
`_take_verified` appends what was accepted and rolls the rest back: the sequence counts as
computed only up to its accepted tokens, and blocks that held only rejected ones go back to the
pool. It runs with synchronous scheduling (a step's accepted length must be known before the
next is scheduled). docs/engines.md ("Speculative decoding") has the rest.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import cast

import structlog

from kvmesh.engine import faults
from kvmesh.engine.config import EngineConfig
from kvmesh.engine.drafts import Drafter, NgramDrafter
from kvmesh.engine.executor import (
    AsyncModelExecutor,
    Exporter,
    ModelExecutor,
    Sampled,
    StepHandle,
)
from kvmesh.engine.scheduler import ScheduledChunk, Scheduler
from kvmesh.engine.sequence import PENDING, SeqKind, SeqState, Sequence
from kvmesh.errors import InvalidRequestError, OverloadedError, UnknownRequestError
from kvmesh.kv.block_pool import BlockId, BlockPool
from kvmesh.kv.errors import LayoutMismatchError
from kvmesh.kv.events import KvEventLog
from kvmesh.kv.hashing import root_hash
from kvmesh.kv.layout import compatible
from kvmesh.sampling import SamplingParams, TokenLogprob
from kvmesh.text.detokenizer import IncrementalDetokenizer
from kvmesh.text.tokenizer import Tokenizer
from kvmesh.types import (
    EngineInfo,
    EngineStats,
    FinishReason,
    GenerateRequest,
    KvExport,
    KvImportPlan,
    LoadSnapshot,
    PrefillOutput,
    TokenOutput,
    TransferMode,
)
from kvmesh.validation import validate_request

log = structlog.get_logger(__name__)

StepOutput = TokenOutput | PrefillOutput


@dataclass(slots=True)
class _Span:
    """What a step computed for one sequence: tokens [start, end) into `blocks`."""

    seq: Sequence
    start: int
    end: int
    blocks: list[BlockId]  # the sequence's block list when launched (kept if it is released)
    num_drafts: int = 0  # draft tokens computed after [start, end) (speculative decoding)


@dataclass(slots=True)
class _InFlight:
    """A launched step not yet read (async scheduling)."""

    spans: list[_Span]
    handle: StepHandle

    def writes_any(self, block_ids: Iterable[BlockId], block_size: int) -> bool:
        written = {
            b
            for span in self.spans
            for b in span.blocks[span.start // block_size : (span.end - 1) // block_size + 1]
        }
        return not written.isdisjoint(block_ids)


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        *,
        executor: ModelExecutor,
        info: EngineInfo,
        tokenizer: Tokenizer | None,
        eos_token_ids: Iterable[int],
        exporter: Exporter | None = None,
    ) -> None:
        config.validate()
        self.exporter = exporter  # exports in another layout; None: pin the cache's blocks
        self.config = config
        self.executor = executor
        self.info = info
        self.tokenizer = tokenizer
        self.pool = BlockPool(info.num_blocks, enable_prefix_cache=config.enable_prefix_cache)
        self.block_size = info.block_size
        self.max_model_len = info.max_model_len
        self.scheduler = Scheduler(
            self.pool,
            block_size=info.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            drafter=self._drafter(config),
            max_model_len=info.max_model_len,
        )
        eos = set(eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.stats = EngineStats()
        self.kv_events = KvEventLog()
        self._requests: dict[str, Sequence] = {}  # waiting or running
        self._exports: dict[str, list[BlockId]] = {}
        self._imports: dict[str, Sequence] = {}  # reserved blocks, not yet decoding
        self._last_step_seconds = 0.0
        # Async scheduling: steps are launched one ahead of reading them (see `step`).
        self._launcher = self._async_launcher(config)
        self._in_flight: _InFlight | None = None
        self._check_step = faults.from_environment()  # None unless a test plants a fault
        self._failures: list[tuple[str, Exception]] = []  # requests a step failed, not yet told
        log.info(
            "engine ready",
            engine=info.engine,
            model=info.model_id,
            device=info.device,
            dtype=info.dtype,
            attention_backend=info.attention_backend,
            kv_blocks=info.num_blocks,
            block_size=info.block_size,
            max_model_len=info.max_model_len,
            async_scheduling=self.async_scheduling,
            speculate=config.speculate,
        )

    def _drafter(self, config: EngineConfig) -> Drafter | None:
        if config.speculate is None:
            return None
        if not getattr(self.executor, "verifies_drafts", False):
            raise InvalidRequestError(
                f"the {self.info.engine} engine cannot verify draft tokens (speculate)"
            )
        return NgramDrafter(config.num_speculative_tokens, config.ngram_max, config.ngram_min)

    def _async_launcher(self, config: EngineConfig) -> AsyncModelExecutor | None:
        """The executor, if steps are to be launched ahead (it has `launch` and it was asked
        for, or not asked and the executor runs ahead of the host); else None."""
        can = hasattr(self.executor, "launch")
        wanted = config.async_scheduling
        if config.speculate is not None:
            # EngineConfig.validate refuses async_scheduling=True with it.
            log.info("speculative decoding: scheduling synchronously", speculate=config.speculate)
            return None
        if wanted is None:
            wanted = can and bool(getattr(self.executor, "launches_ahead", False))
        elif wanted and not can:
            raise InvalidRequestError(
                f"the {self.info.engine} engine cannot schedule asynchronously"
            )
        return cast("AsyncModelExecutor", self.executor) if wanted else None

    @property
    def async_scheduling(self) -> bool:
        return self._launcher is not None

    def set_drafter(self, drafter: Drafter | None, *, async_scheduling: bool = False) -> None:
        """Benchmarks: change how the next runs decode (no drafts, n-gram drafts, an oracle's),
        on an idle core. Async scheduling only without drafts, where the executor can launch."""
        if self.has_work:
            raise InvalidRequestError("change speculation only while the engine is idle")
        if drafter is not None and async_scheduling:
            raise InvalidRequestError("speculative decoding runs with synchronous scheduling")
        if drafter is not None and not getattr(self.executor, "verifies_drafts", False):
            raise InvalidRequestError(f"the {self.info.engine} engine cannot verify draft tokens")
        if async_scheduling and not hasattr(self.executor, "launch"):
            raise InvalidRequestError(
                f"the {self.info.engine} engine cannot schedule asynchronously"
            )
        self.scheduler.drafter = drafter
        self._launcher = cast("AsyncModelExecutor", self.executor) if async_scheduling else None

    # -- requests ------------------------------------------------------------------------------

    def validate(self, request: GenerateRequest) -> None:
        """Raise InvalidRequestError if the request can never be served. Thread-safe."""
        validate_request(
            request.prompt_token_ids,
            request.sampling,
            vocab_size=self.info.vocab_size,
            max_model_len=self.max_model_len,
            has_tokenizer=self.tokenizer is not None,
        )

    def add(self, request: GenerateRequest, *, prefill_only: bool = False) -> None:
        self.validate(request)
        self._check_new_id(request.request_id)
        if len(self.scheduler.waiting) >= self.config.max_num_waiting:
            raise OverloadedError(
                f"the engine's queue is full ({len(self.scheduler.waiting)} requests waiting, "
                f"limit {self.config.max_num_waiting})"
            )
        kind = SeqKind.PREFILL_ONLY if prefill_only else SeqKind.GENERATE
        seq = self._new_sequence(request, kind)
        self.stats.num_prompt_tokens += seq.num_prompt_tokens
        self._requests[request.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> TokenOutput | None:
        """Stop a request wherever it is and free what it holds; its final output, if running."""
        if request_id in self._exports:
            self._release_export_blocks(self._exports.pop(request_id))
        if request_id in self._imports:
            self.pool.release(self._imports.pop(request_id).block_ids)
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        seq.finish_reason = FinishReason.ABORT
        self.stats.num_requests_aborted += 1
        self.publish_events()
        return self._output(seq, [], "")

    def release_export(self, request_id: str) -> None:
        """The decode side has the KV (or gave up): unpin the prefill's blocks."""
        blocks = self._exports.pop(request_id, None)
        if blocks is None:
            raise UnknownRequestError(f"no KV export for request {request_id!r}")
        self._release_export_blocks(blocks)

    def _release_export_blocks(self, blocks: list[BlockId]) -> None:
        if self.exporter is not None:
            self.exporter.release(blocks)
        else:
            self.pool.release(blocks)

    # -- decode with imported KV ---------------------------------------------------------------

    def reserve_import(self, request: GenerateRequest, export: KvExport) -> KvImportPlan:
        """Reserve local blocks for a prompt whose KV another engine computed.

        Full blocks already in the local prefix cache are reused; the rest must be written by the
        caller (a KV transfer, converted if the export's layout differs) before `start_import`.
        """
        self.validate(request)
        self._check_new_id(request.request_id)
        self._check_export(request, export)
        seq = self._new_sequence(request, SeqKind.IMPORTED)
        seq.extend_hashes(self.block_size)
        hits = self.pool.lookup(seq.block_hashes)
        needed = -(-seq.num_prompt_tokens // self.block_size) - len(hits)
        reclaimed = sum(1 for b in hits if self.pool.ref_count(b) == 0)
        if needed > self.pool.num_free_blocks - reclaimed:
            raise OverloadedError(
                f"no room to import {needed} KV blocks ({self.pool.num_free_blocks} free)"
            )
        self.pool.acquire(hits)
        seq.block_ids = list(hits) + self.pool.allocate(needed)
        self._fence(seq.block_ids)  # the caller writes them as soon as this returns
        seq.num_registered_blocks = len(hits)
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.num_cached_tokens = seq.num_prompt_tokens
        self._imports[request.request_id] = seq
        self.publish_events()  # allocation may have evicted cached blocks
        return KvImportPlan(
            request_id=request.request_id,
            block_ids=tuple(seq.block_ids),
            num_cached_blocks=len(hits),
            num_tokens=seq.num_prompt_tokens,
            block_size=self.block_size,
            layout_fingerprint=self.info.layout_fingerprint,
        )

    def start_import(self, request_id: str, first_token_id: int) -> TokenOutput | None:
        """The reserved blocks hold the prompt's KV: decode from the prefill's first token.

        Returns a final output at once if that token already ends the request.
        """
        seq = self._imports.pop(request_id, None)
        if seq is None:
            raise UnknownRequestError(f"no import reserved for request {request_id!r}")
        if not 0 <= first_token_id < self.info.vocab_size:
            self.pool.release(seq.block_ids)
            raise InvalidRequestError(f"first token id {first_token_id} is outside the vocabulary")
        cached_tokens = seq.num_registered_blocks * self.block_size
        self.stats.num_imported_tokens += max(seq.num_prompt_tokens - cached_tokens, 0)
        self.stats.num_prompt_tokens += seq.num_prompt_tokens
        self._register_full_blocks(seq)
        # The prefill side streamed the first token and its text; only the state moves on.
        seq.token_ids.append(first_token_id)
        if seq.detokenizer is not None:
            seq.detokenizer.add([first_token_id])
        self._check_finish(seq, first_token_id)
        if seq.finish_reason is not None:
            self.pool.release(seq.block_ids)
            seq.block_ids = []
            self.stats.num_requests_finished += 1
            return self._output(seq, [], "")
        self._requests[request_id] = seq
        self.scheduler.add(seq, front=True)
        return None

    # -- stepping ------------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    def step(self) -> list[StepOutput]:
        """Run one step; what requests produced (with async scheduling: the previous step's).

        A step that raises before it runs on the device (building its inputs, a planted fault)
        is retried without its newest requests, halving, until the request that makes it fail
        is alone: that request fails (`take_failures`), the others go on. With async scheduling
        the retries run synchronously, after the previous step is read. A step that fails once
        launched (a device error) still fails every request (`fail_all`)."""
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        self.stats.num_preemptions += len(plan.preempted)
        self.stats.num_prefix_hit_tokens += plan.num_prefix_hit_tokens
        outputs: list[StepOutput] = []
        if self._launcher is None:  # run the step and read it
            if plan.chunks:
                outputs += self._execute_isolating(self._oldest_first(plan.chunks))
        else:
            # Queue this step, then read the previous one while the device runs this one.
            launched, failed_launch = None, False
            if plan.chunks:
                try:
                    if self._check_step is not None:
                        self._check_step(plan.chunks)
                    handle = self._launcher.launch(plan.chunks)
                except Exception as e:
                    log.warning(
                        "engine step failed to launch; isolating its requests", error=repr(e)
                    )
                    failed_launch = True
                else:
                    launched = _InFlight(self._advance(plan.chunks, pending=True), handle)
            previous, self._in_flight = self._in_flight, launched
            if previous is not None:
                outputs += self._take(previous.spans, previous.handle.result())
            if failed_launch:  # every input is known now: run it here, isolating the culprit
                live = [c for c in plan.chunks if c.seq.state is not SeqState.FINISHED]
                outputs += self._execute_isolating(self._oldest_first(live))
        self.publish_events()
        self._last_step_seconds = time.perf_counter() - started
        return outputs

    def take_failures(self) -> list[tuple[str, Exception]]:
        """The requests steps failed since the last call (each already dropped), with why."""
        failures, self._failures = self._failures, []
        return failures

    def _oldest_first(self, chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
        arrival = {request_id: i for i, request_id in enumerate(self._requests)}
        return sorted(chunks, key=lambda c: arrival.get(c.seq.request_id, len(arrival)))

    def _execute_isolating(self, chunks: list[ScheduledChunk]) -> list[StepOutput]:
        """Run `chunks` synchronously; if that raises, run the older half and the newer half
        apart (recursively), so only a request that fails alone is failed."""
        try:
            if self._check_step is not None:
                self._check_step(chunks)
            sampled = self.executor.execute(chunks)
        except Exception as e:
            if len(chunks) == 1:
                self._fail(chunks[0].seq, e)
                return []
            half = len(chunks) // 2
            log.warning(
                "engine step failed; retrying without its newest requests",
                requests=len(chunks),
                retrying=half,
                error=repr(e),
            )
            return self._execute_isolating(chunks[:half]) + self._execute_isolating(chunks[half:])
        return self._take(self._advance(chunks, pending=False), sampled)

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """Drop a request that fails a step on its own; its stream gets the error."""
        log.error(
            "request fails the engine step on its own; failing it",
            request_id=seq.request_id,
            error=repr(error),
        )
        self.abort(seq.request_id)
        self.stats.num_requests_failed += 1
        self._failures.append((seq.request_id, error))

    def _advance(self, chunks: list[ScheduledChunk], *, pending: bool) -> list[_Span]:
        """Count the chunks' tokens as computed; with `pending`, add a PENDING token for each
        sequence the step samples for."""
        spans = []
        for chunk in chunks:
            seq = chunk.seq
            start = seq.num_computed_tokens
            num_drafts = len(chunk.draft_token_ids)
            # Drafts count as computed once accepted (`_take_verified`).
            seq.num_computed_tokens += chunk.num_tokens - num_drafts
            self.stats.num_computed_tokens += chunk.num_tokens
            spans.append(_Span(seq, start, seq.num_computed_tokens, seq.block_ids, num_drafts))
            # Cached now, not when read: a prompt waiting for these blocks finds them at the
            # next schedule, and whatever reads them runs after this step on the device.
            self._register_full_blocks(seq)
            if pending and seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(PENDING)
                seq.num_pending += 1
                seq.ends_at_pending = self._ends_at(seq, len(seq.token_ids))
        self.stats.num_steps += 1
        return spans

    def _take(self, spans: list[_Span], sampled: list[Sampled]) -> list[StepOutput]:
        """Read a step's samples into their sequences; cache the blocks they complete."""
        for span in spans:
            if span.seq.state is not SeqState.FINISHED:
                self._register_full_blocks(span.seq)  # blocks that held a pending token
        drafted = {span.seq: span.num_drafts for span in spans if span.num_drafts}
        if not drafted:
            appended = [
                self._append_token(s.seq, s)
                for s in sampled
                if s.seq.state is not SeqState.FINISHED
            ]
            return [out for out in appended if out is not None]  # None: a failed export
        outputs: list[StepOutput | None] = []
        i = 0
        while i < len(sampled):  # a sequence with drafts has 1 to k + 1 samples in a row
            seq, j = sampled[i].seq, i + 1
            while j < len(sampled) and sampled[j].seq is seq:
                j += 1
            if seq.state is not SeqState.FINISHED:
                if seq in drafted:
                    outputs.append(self._take_verified(seq, sampled[i:j], drafted[seq]))
                else:
                    outputs.append(self._append_token(seq, sampled[i]))
            i = j
        return [out for out in outputs if out is not None]

    def _take_verified(self, seq: Sequence, samples: list[Sampled], num_drafts: int) -> StepOutput:
        """Append a verify step's tokens (accepted drafts, then the model's own) up to the first
        that ends the request, as if they came one step each; roll back the rejected drafts."""
        self.stats.num_spec_verifications += 1
        self.stats.num_spec_draft_tokens += num_drafts
        self.stats.num_spec_accepted_tokens += len(samples) - 1
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        text = ""
        for s in samples:
            seq.token_ids.append(s.token_id)
            self.stats.num_generated_tokens += 1
            token_ids.append(s.token_id)
            if s.logprob is not None:
                logprobs.append(s.logprob)
            if seq.detokenizer is not None:
                text += seq.detokenizer.add([s.token_id])
            self._check_finish(seq, s.token_id)
            if seq.finish_reason is not None:
                break
        if seq.finish_reason is not None:
            if seq.detokenizer is not None:
                text += seq.detokenizer.flush()
            out = self._output(seq, token_ids, text, logprobs)
            self._finish(seq)
            return out
        # The last token and the accepted drafts have their KV; the new last token has none yet.
        # What rejected drafts wrote past that is never cached and is overwritten later.
        seq.num_computed_tokens = seq.num_tokens - 1
        self._register_full_blocks(seq)
        self.scheduler.release_blocks_past_computed(seq)
        return self._output(seq, token_ids, text, logprobs)

    def _ends_at(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether a sequence ends once it holds `num_tokens`, whatever the last one is."""
        return seq.kind is SeqKind.PREFILL_ONLY or self._at_limit(seq, num_tokens)

    def _at_limit(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `num_tokens` reaches the request's max_tokens or the context limit."""
        outputs = num_tokens - seq.num_prompt_tokens
        return outputs >= seq.sampling.max_tokens or num_tokens >= self.max_model_len

    def _fence(self, block_ids: list[BlockId]) -> None:
        """Before others write `block_ids` (a KV import): wait for the step in flight if it
        writes any of them (they were freed while it ran)."""
        if self._in_flight is not None and self._in_flight.writes_any(block_ids, self.block_size):
            self._in_flight.handle.fence()

    def fail_all(self, error: BaseException) -> list[str]:
        """After an unexpected step failure: drop every request, keep the engine usable."""
        self._in_flight = None  # whatever it sampled is lost with the requests
        failed = list(self._requests)
        for request_id in failed:
            self.abort(request_id)
        log.error("engine step failed; requests dropped", error=repr(error), requests=len(failed))
        return failed

    def warm_up(self) -> None:
        """Run one throwaway request so the first real one does not pay one-time costs
        (kernel selection, allocator growth). Leaves no trace in the cache, events or stats."""
        self.executor.warm_up()
        caching, self.pool.enable_prefix_cache = self.pool.enable_prefix_cache, False
        try:
            prompt = tuple(range(1, min(2 * self.block_size, self.max_model_len - 2) + 1))
            self.add(
                GenerateRequest("kvmesh-warm-up", prompt, SamplingParams(2, 0.0, ignore_eos=True))
            )
            while self.has_work:
                self.step()
        finally:
            self.pool.enable_prefix_cache = caching
            self.stats = EngineStats()

    # -- introspection -------------------------------------------------------------------------

    def load(self) -> LoadSnapshot:
        running, waiting = self.scheduler.running, self.scheduler.waiting
        live = [*running, *waiting]
        pinned = 0 if self.exporter else sum(len(b) for b in self._exports.values())
        pinned += sum(len(s.block_ids) for s in self._imports.values())
        return LoadSnapshot(
            num_running=len(running),
            num_waiting=len(waiting),
            num_tokens_in_flight=sum(s.num_tokens for s in live),
            num_prefill_tokens_pending=sum(
                s.num_uncomputed_tokens for s in live if s.is_prefilling
            ),
            num_blocks_used=self.pool.num_used_blocks,
            num_blocks_total=self.pool.num_blocks,
            num_blocks_pinned=pinned,
            step_seconds=self._last_step_seconds,
        )

    def is_idle_and_whole(self) -> bool:
        """Nothing in flight, nothing pinned, every block back in the pool."""
        if self._in_flight is not None and not self._requests:
            self.step()  # a step that only computed for ended requests: finish it, read nothing
        idle = not (self._requests or self._exports or self._imports or self._in_flight)
        exports_whole = self.exporter is None or self.exporter.is_whole()
        return idle and self.pool.is_whole() and exports_whole

    # -- internals -----------------------------------------------------------------------------

    def _check_new_id(self, request_id: str) -> None:
        if (
            request_id in self._requests
            or request_id in self._exports
            or request_id in self._imports
        ):
            raise InvalidRequestError(f"request id {request_id!r} is already in use")

    def _check_export(self, request: GenerateRequest, export: KvExport) -> None:
        ours = self.info.layout_fingerprint
        difference = compatible(export.layout_fingerprint, ours)
        if difference is None and export.block_size < 1:
            difference = f"block size {export.block_size}"
        if difference is not None:
            raise LayoutMismatchError(
                f"cannot import KV: layout {export.layout_fingerprint} is not readable here "
                f"({ours}): {difference}"
            )
        n = len(request.prompt_token_ids)
        problems = []
        if export.num_tokens != n:
            problems.append(f"export holds {export.num_tokens} tokens, the prompt has {n}")
        if len(export.block_ids) != -(-n // max(export.block_size, 1)):
            problems.append(f"export has {len(export.block_ids)} blocks for {n} tokens")
        if problems:
            raise InvalidRequestError("cannot import KV: " + "; ".join(problems))

    def _new_sequence(self, request: GenerateRequest, kind: SeqKind) -> Sequence:
        params = request.sampling
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(self.tokenizer, stop=params.stop)
        return Sequence(
            request_id=request.request_id,
            token_ids=list(request.prompt_token_ids),
            num_prompt_tokens=len(request.prompt_token_ids),
            sampling=params,
            sampler=self.executor.make_sampler(params),
            kind=kind,
            detokenizer=detokenizer,
            root=root_hash(
                self.info.model_id, salt=request.cache_salt, kv_dtype=self.info.kv_dtype
            ),
        )

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Put the full blocks whose tokens are computed and known in the prefix cache."""
        seq.extend_hashes(self.block_size)
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_hashes))
        first = seq.num_registered_blocks
        if full > first:
            parent = seq.block_hashes[first - 1] if first else seq.root
            self.pool.cache(seq.block_ids[first:full], seq.block_hashes[first:full], parent)
            seq.num_registered_blocks = full

    def _append_token(self, seq: Sequence, s: Sampled) -> StepOutput | None:
        if seq.num_pending:
            seq.resolve(s.token_id)
        else:
            seq.token_ids.append(s.token_id)
        self.stats.num_generated_tokens += 1
        text = seq.detokenizer.add([s.token_id]) if seq.detokenizer else ""
        self._check_finish(seq, s.token_id)
        if seq.finish_reason is not None:
            seq.drop_pending()
        if seq.finish_reason is not None and seq.detokenizer is not None:
            text += seq.detokenizer.flush()
        logprobs = [s.logprob] if s.logprob is not None else []
        out = self._output(seq, [s.token_id], text, logprobs)
        if seq.kind is SeqKind.PREFILL_ONLY:
            return self._finish_prefill(seq, out)
        if seq.finish_reason is not None:
            self._finish(seq)
        return out

    def _check_finish(self, seq: Sequence, token_id: int) -> None:
        params = seq.sampling
        is_eos = not params.ignore_eos and token_id in self.eos_token_ids
        if token_id in params.stop_token_ids or is_eos:
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, token_id
        elif seq.detokenizer is not None and seq.detokenizer.stopped_on is not None:
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, seq.detokenizer.stopped_on
        elif self._at_limit(seq, seq.num_resolved_tokens):
            seq.finish_reason = FinishReason.LENGTH

    def _finish_prefill(self, seq: Sequence, first: TokenOutput) -> PrefillOutput | None:
        """Pin the prompt's blocks for export (or convert them out: `exporter`), unless the
        first token already ended it. None: the request failed (no room to export)."""
        if seq.finish_reason is not None:
            self._finish(seq)
            return PrefillOutput(first, None)
        blocks = list(seq.block_ids[: -(-seq.num_prompt_tokens // self.block_size)])
        layout = self.info.layout_fingerprint
        if self.exporter is None:
            self.pool.acquire(blocks)  # the export's own reference outlives the sequence's
        else:
            try:
                blocks = [BlockId(b) for b in self.exporter.export(blocks, seq.num_prompt_tokens)]
            except OverloadedError as e:
                self._fail(seq, e)
                return None
            layout = self.exporter.layout_fingerprint
        self._exports[seq.request_id] = blocks
        export = KvExport(
            request_id=seq.request_id,
            block_ids=tuple(blocks),
            num_tokens=seq.num_prompt_tokens,
            block_size=self.block_size,
            layout_fingerprint=layout,
        )
        if self.info.transfer_mode is TransferMode.ENGINE:
            export = replace(export, opaque=self.executor.export_state(export))
        self._finish(seq)
        return PrefillOutput(first, export)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self._requests.pop(seq.request_id, None)
        self.stats.num_requests_finished += 1

    def _output(
        self,
        seq: Sequence,
        token_ids: list[int],
        text: str,
        logprobs: list[TokenLogprob] | None = None,
    ) -> TokenOutput:
        return TokenOutput(
            request_id=seq.request_id,
            token_ids=token_ids,
            text=text,
            logprobs=logprobs or [],
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
        )

    def publish_events(self) -> None:
        events = self.pool.take_events()
        if events:
            self.kv_events.extend(events)
