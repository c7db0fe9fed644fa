"""`TrtllmEngine` (registry name `trtllm`): the `Engine` protocol over TensorRT-LLM's LLM API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import structlog

from kvmesh import models
from kvmesh.engine.config import EngineConfig
from kvmesh.engine.trtllm import library
from kvmesh.engine.trtllm.events import EventMapper
from kvmesh.engine.trtllm.options import TrtllmOptions
from kvmesh.engine.trtllm.state import STATE_FORMAT, ContextState
from kvmesh.errors import (
    EngineError,
    InvalidRequestError,
    KvmeshError,
    OverloadedError,
    StoppedError,
    UnknownRequestError,
)
from kvmesh.kv.errors import TransferError
from kvmesh.kv.events import KvEventLog
from kvmesh.kv.hashing import BlockHash
from kvmesh.sampling import SamplingParams
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

# TensorRT-LLM 1.0's CompletionOutput.finish_reason: 'stop', 'length', 'timeout', 'cancelled'.
_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}


@dataclass(slots=True, eq=False)
class _Live:
    """A request handed to the library, until its stream ends."""

    request: GenerateRequest
    result: Any  # the library's RequestOutput (async-iterable while streaming)
    num_cached_tokens: int
    num_delivered: int = 0  # output tokens already streamed (an import: first_gen_tokens)
    first_token_id: int | None = None  # an import: the prefill's first token
    pending: Any = None  # an import: its first output, read while the KV moved
    streaming: bool = False  # a stream reads it (and ends it); an import is reserved until then
    iterator: AsyncIterator[Any] | None = None


@dataclass(slots=True, eq=False)
class _Export:
    result: Any  # the finished context-only request, whose KV waits for its reader
    num_blocks: int


class TrtllmEngine:
    """TensorRT-LLM behind kvmesh's engine protocol; its cache transceiver moves the KV."""

    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self._config = config
        self._options = TrtllmOptions.parse(config.options)
        self._lib = library.load()
        source = models.resolve(config.model)
        model_config = models.read_model_config(source)
        vocab_size = self._options.vocab_size or model_config.vocab_size
        self._max_model_len = min(
            model_config.max_position_embeddings,
            config.max_model_len or model_config.max_position_embeddings,
        )
        model_id = config.model_id or source.model_id
        self._info = EngineInfo(
            engine="trtllm",
            model_id=model_id,
            block_size=config.block_size,
            num_blocks=config.num_blocks or 0,  # the library's count arrives with its stats
            layout_fingerprint=(
                f"{STATE_FORMAT}:{model_id}:B{config.block_size}:"
                f"{self._options.cache_transceiver_backend}:TP{self._options.tensor_parallel_size}"
            ),
            max_model_len=self._max_model_len,
            vocab_size=vocab_size,
            device="cuda",
            dtype=config.dtype,
            kv_dtype=config.dtype,
            attention_backend=f"trtllm-{self._options.backend}",
            transfer_mode=TransferMode.ENGINE,
        )
        self._llm = self._build_llm(str(source.weights_dir or config.model))
        self._events = KvEventLog()
        self._mapper = EventMapper(model_id, self._info.kv_dtype, config.block_size, self._events)
        self._live: dict[str, _Live] = {}
        self._exports: dict[str, _Export] = {}
        self._stats = EngineStats()
        self._iteration: Mapping[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self._stopping = False

    def _build_llm(self, model: str) -> Any:
        lib, options, config = self._lib, self._options, self._config
        kv_cache = {
            "enable_block_reuse": config.enable_prefix_cache,
            "event_buffer_max_size": options.event_buffer_max_size,
            "free_gpu_memory_fraction": (
                options.free_gpu_memory_fraction or config.gpu_memory_fraction
            ),
            "tokens_per_block": config.block_size,
        }
        if config.num_blocks is not None:
            kv_cache["max_tokens"] = config.num_blocks * config.block_size
        transceiver: dict[str, Any] = {"backend": options.cache_transceiver_backend}
        if options.max_tokens_in_buffer is not None:
            transceiver["max_tokens_in_buffer"] = options.max_tokens_in_buffer
        try:
            return lib.LLM(
                model=model,
                backend=options.backend,
                tensor_parallel_size=options.tensor_parallel_size,
                max_batch_size=config.max_num_seqs,
                max_num_tokens=config.max_num_batched_tokens,
                max_seq_len=self._max_model_len,
                enable_iter_perf_stats=True,
                kv_cache_config=lib.KvCacheConfig(**kv_cache),
                cache_transceiver_config=lib.CacheTransceiverConfig(**transceiver),
            )
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(f"TensorRT-LLM refused the engine settings: {e}") from e
        except Exception as e:
            raise EngineError(f"TensorRT-LLM could not start: {e!r}") from e

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        llm = self._llm
        pumps = [self._pump(llm.get_stats_async, self._on_stats)]
        if self._config.enable_prefix_cache and self._options.event_buffer_max_size > 0:
            pumps.append(self._pump(llm.get_kv_cache_events_async, self._mapper.apply))
        self._tasks = [asyncio.create_task(pump) for pump in pumps]

    async def stop(self) -> None:
        if not self._running or self._stopping:
            return
        self._stopping = True
        for live in list(self._live.values()):
            _abort_result(live.result)
        for export in self._exports.values():
            _abort_result(export.result)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self._llm.shutdown)

    # -- what it is ----------------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def tokenizer(self) -> Tokenizer | None:
        return None  # TensorRT-LLM keeps its own; kvmesh's router detokenizes

    def kv_region(self) -> None:
        return None

    def export_region(self) -> None:
        """None: the engine's cache transceiver moves its KV."""
        return None

    @property
    def kv_events(self) -> KvEventLog:
        return self._events

    # -- requests ------------------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenOutput]:
        self._check_new(request)
        sampling = self._sampling(request.sampling)
        return self._stream(lambda: self._submit(request, sampling, None, streaming=True))

    async def prefill(self, request: GenerateRequest) -> PrefillOutput:
        """A context-only request: the first token, and its DisaggregatedParams as the export."""
        self._check_new(request)
        context_only = self._lib.DisaggregatedParams(request_type="context_only")
        sampling = self._sampling(request.sampling, max_tokens=1)
        live = self._submit(request, sampling, context_only, streaming=False)
        try:
            out = await self._last_output(live)
        except BaseException as e:
            _abort_result(live.result)
            if isinstance(e, asyncio.CancelledError):
                self._stats.num_requests_aborted += 1
            raise
        finally:
            self._live.pop(request.request_id, None)
        completion = out.outputs[0]
        token_ids = list(completion.token_ids)
        if completion.finish_reason == "cancelled" or not token_ids:
            if self._stopping:
                raise StoppedError("the engine stopped")
            raise EngineError(f"TensorRT-LLM ended context-only request {request.request_id!r}")
        finish: FinishReason | None = None
        stop_reason = None
        if completion.finish_reason == "stop":  # EOS, a stop token id or string
            finish, stop_reason = FinishReason.STOP, completion.stop_reason
        elif request.sampling.max_tokens == 1:
            finish = FinishReason.LENGTH
        first = TokenOutput(
            request_id=request.request_id,
            token_ids=token_ids[:1],
            text="",
            logprobs=[],
            finish_reason=finish,
            stop_reason=stop_reason,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=live.num_cached_tokens,
            num_output_tokens=1,
        )
        self._stats.num_generated_tokens += 1
        if finish is not None:
            self._stats.num_requests_finished += 1
            _abort_result(live.result)  # nobody will read its KV: let the library free it
            return PrefillOutput(first, None)
        num_tokens = len(request.prompt_token_ids)
        try:
            state = ContextState.of(completion.disaggregated_params, num_tokens)
        except TransferError:
            _abort_result(live.result)
            raise
        self._exports[request.request_id] = _Export(live.result, self._num_blocks(num_tokens))
        export = KvExport(
            request_id=request.request_id,
            block_ids=(),  # TensorRT-LLM does not name its blocks; its transceiver finds them
            num_tokens=num_tokens,
            block_size=self._info.block_size,
            layout_fingerprint=self._info.layout_fingerprint,
            opaque=state.encode(model_id=self._info.model_id, block_size=self._info.block_size),
        )
        return PrefillOutput(first, export)

    async def release_export(self, request_id: str) -> None:
        export = self._exports.pop(request_id, None)
        if export is None:
            raise UnknownRequestError(f"no KV export for request {request_id!r}")
        _abort_result(export.result)

    async def reserve_import(self, request: GenerateRequest, export: KvExport) -> KvImportPlan:
        """Start the generation-only request and wait for its first output: by then the
        library's cache transceiver has moved the KV. A transfer that fails raises
        TransferError, and the decode service computes the prompt locally instead."""
        self._check_new(request)
        state = ContextState.decode(
            export.opaque, model_id=self._info.model_id, block_size=self._info.block_size
        )
        if state.num_tokens != len(request.prompt_token_ids):
            raise TransferError(
                f"the handle's KV holds {state.num_tokens} tokens; the prompt has "
                f"{len(request.prompt_token_ids)}"
            )
        generation_only = self._lib.DisaggregatedParams(
            request_type="generation_only",
            first_gen_tokens=list(state.first_gen_tokens),
            ctx_request_id=state.ctx_request_id,
            opaque_state=state.opaque_state,
            draft_tokens=list(state.draft_tokens) if state.draft_tokens is not None else None,
        )
        live = self._submit(
            request, self._sampling(request.sampling), generation_only, streaming=True
        )
        live.num_cached_tokens = state.num_tokens
        live.num_delivered = len(state.first_gen_tokens)
        live.first_token_id = state.first_gen_tokens[0]
        try:
            live.pending = await anext(self._iterate(live), None)
            if live.pending is None:
                raise EngineError("the generation-only request ended without an output")
        except BaseException as e:
            self._live.pop(request.request_id, None)
            _abort_result(live.result)
            if isinstance(e, asyncio.CancelledError):
                self._stats.num_requests_aborted += 1
            if isinstance(e, EngineError):
                raise TransferError(
                    f"TensorRT-LLM's generation-only request failed before its first token "
                    f"(the KV did not arrive): {e}"
                ) from e
            raise
        self._stats.num_imported_tokens += state.num_tokens
        num_blocks = self._num_blocks(state.num_tokens)
        return KvImportPlan(
            request_id=request.request_id,
            block_ids=tuple(range(num_blocks)),  # positions: the library keeps its block ids
            num_cached_blocks=0,
            num_tokens=state.num_tokens,
            block_size=self._info.block_size,
            layout_fingerprint=self._info.layout_fingerprint,
            filled_by_engine=True,
        )

    def generate_imported(
        self, plan: KvImportPlan, first_token_id: int
    ) -> AsyncIterator[TokenOutput]:
        self._check_running()
        live = self._live.get(plan.request_id)
        if live is None or live.first_token_id is None:
            raise UnknownRequestError(f"no import reservation for request {plan.request_id!r}")
        if first_token_id != live.first_token_id:
            raise InvalidRequestError(
                f"first token {first_token_id} differs from the prefill's {live.first_token_id}"
            )
        return self._stream(lambda: live)

    async def abort(self, request_id: str) -> None:
        live = self._live.get(request_id)
        if live is not None:
            _abort_result(live.result)
            if not live.streaming:  # an import reservation no stream will end
                del self._live[request_id]
                self._stats.num_requests_aborted += 1
        export = self._exports.pop(request_id, None)
        if export is not None:
            _abort_result(export.result)

    # -- state ---------------------------------------------------------------------------------

    def load(self) -> LoadSnapshot:
        it = self._iteration
        kv = it.get("kvCacheStats") or {}
        in_flight = sum(
            len(live.request.prompt_token_ids) + live.num_delivered for live in self._live.values()
        )
        pending = sum(
            len(live.request.prompt_token_ids)
            for live in self._live.values()
            if live.num_delivered == 0
        )
        return LoadSnapshot(
            num_running=int(it.get("numActiveRequests", len(self._live))),
            num_waiting=int(it.get("numQueuedRequests", 0)),
            num_tokens_in_flight=in_flight,
            num_prefill_tokens_pending=pending,
            num_blocks_used=int(kv.get("usedNumBlocks", 0)),
            num_blocks_total=int(kv.get("maxNumBlocks", self._info.num_blocks)),
            num_blocks_pinned=sum(e.num_blocks for e in self._exports.values()),
            step_seconds=float(it.get("iterLatencyMS", 0.0)) / 1000,
        )

    def stats(self) -> EngineStats:
        stats = replace(self._stats)
        kv = self._iteration.get("kvCacheStats") or {}
        stats.num_prefix_hit_tokens = int(kv.get("reusedBlocks", 0)) * self._info.block_size
        stats.num_steps = int(self._iteration.get("iter", -1)) + 1
        stats.num_computed_tokens = (
            max(0, stats.num_prompt_tokens - stats.num_prefix_hit_tokens)
            + stats.num_generated_tokens
        )
        return stats

    async def kv_snapshot(self) -> tuple[list[BlockHash], int]:
        return self._mapper.cached_hashes(), self._events.last_event_id

    async def is_idle_and_whole(self) -> bool:
        return not self._live and not self._exports

    # -- internals -----------------------------------------------------------------------------

    def _check_running(self) -> None:
        if not self._running or self._stopping:
            raise StoppedError("the engine is not running; call start() first")

    def _check_new(self, request: GenerateRequest) -> None:
        self._check_running()
        validate_request(
            request.prompt_token_ids,
            request.sampling,
            vocab_size=self._info.vocab_size,
            max_model_len=self._max_model_len,
        )
        if request.sampling.logprobs or request.sampling.top_logprobs:
            raise InvalidRequestError("the trtllm engine does not return logprobs yet")
        if request.request_id in self._live or request.request_id in self._exports:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        limit = self._config.max_num_seqs + self._config.max_num_waiting
        if len(self._live) >= limit:
            raise OverloadedError(
                f"the engine holds {len(self._live)} requests (limit {limit}: --max-num-seqs "
                "plus --max-num-waiting)"
            )

    def _sampling(self, params: SamplingParams, *, max_tokens: int | None = None) -> Any:
        return self._lib.SamplingParams(
            max_tokens=max_tokens or params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k or None,
            seed=params.seed,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            ignore_eos=params.ignore_eos,
        )

    def _submit(
        self, request: GenerateRequest, sampling: Any, disaggregated: Any, *, streaming: bool
    ) -> _Live:
        try:
            result = self._llm.generate_async(
                list(request.prompt_token_ids),
                sampling_params=sampling,
                streaming=streaming,
                disaggregated_params=disaggregated,
            )
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(f"TensorRT-LLM refused the request: {e}") from e
        except Exception as e:
            raise EngineError(f"TensorRT-LLM could not take the request: {e!r}") from e
        cached = self._mapper.num_cached_prefix_tokens(request.prompt_token_ids, request.cache_salt)
        live = _Live(request, result, num_cached_tokens=cached)
        self._live[request.request_id] = live
        self._stats.num_prompt_tokens += len(request.prompt_token_ids)
        return live

    async def _iterate(self, live: _Live) -> AsyncGenerator[Any, None]:
        """The library's outputs of one request; its failures as EngineError."""
        if live.iterator is None:
            live.iterator = aiter(live.result)
        while True:
            try:
                out = await anext(live.iterator)
            except StopAsyncIteration:
                return
            except (KvmeshError, asyncio.CancelledError):
                raise
            except Exception as e:
                self._stats.num_requests_failed += 1
                raise EngineError(
                    f"TensorRT-LLM failed request {live.request.request_id!r}: {e}"
                ) from e
            yield out

    async def _last_output(self, live: _Live) -> Any:
        last = None
        async for out in self._iterate(live):
            last = out
            if out.finished:
                break
        if last is None:
            raise EngineError(f"TensorRT-LLM returned nothing for {live.request.request_id!r}")
        return last

    async def _stream(self, open_live: Callable[[], _Live]) -> AsyncGenerator[TokenOutput, None]:
        """Stream one request's outputs, submitted (or found) when the stream is first read;
        leaving early (break, cancellation) aborts it."""
        done = False
        live = open_live()
        live.streaming = True
        outputs = self._iterate(live)
        try:
            while not done:
                out, live.pending = live.pending, None
                if out is None:
                    out = await anext(outputs, None)
                if out is None:
                    raise EngineError(
                        f"TensorRT-LLM ended request {live.request.request_id!r} unfinished"
                    )
                if self._stopping:
                    raise StoppedError("the engine stopped")
                token_output = self._token_output(live, out)
                done = token_output.finished
                if token_output.token_ids or done:
                    yield token_output
        finally:
            self._live.pop(live.request.request_id, None)
            if not done:
                _abort_result(live.result)
                self._stats.num_requests_aborted += 1

    def _token_output(self, live: _Live, out: Any) -> TokenOutput:
        completion = out.outputs[0]
        token_ids = list(completion.token_ids)
        new = token_ids[live.num_delivered :]
        live.num_delivered = max(live.num_delivered, len(token_ids))
        self._stats.num_generated_tokens += len(new)
        finish: FinishReason | None = None
        if out.finished:
            finish = _FINISH.get(completion.finish_reason, FinishReason.ABORT)
            if finish is FinishReason.ABORT:
                self._stats.num_requests_aborted += 1
            else:
                self._stats.num_requests_finished += 1
        return TokenOutput(
            request_id=live.request.request_id,
            token_ids=new,
            text="",
            logprobs=[],
            finish_reason=finish,
            stop_reason=completion.stop_reason if finish is FinishReason.STOP else None,
            num_prompt_tokens=len(live.request.prompt_token_ids),
            num_cached_tokens=live.num_cached_tokens,
            num_output_tokens=live.num_delivered,
        )

    def _num_blocks(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self._info.block_size)

    def _on_stats(self, stat: Mapping[str, Any]) -> None:
        self._iteration = stat
        max_blocks = (stat.get("kvCacheStats") or {}).get("maxNumBlocks")
        if max_blocks and self._info.num_blocks != max_blocks:
            self._info = replace(self._info, num_blocks=int(max_blocks))

    async def _pump(
        self,
        source: Callable[[float], Any],
        sink: Callable[[Mapping[str, Any]], None],
    ) -> None:
        """Feed `sink` with what `source(timeout)` yields (an async iterable that ends when
        nothing came within the timeout), for as long as the engine runs."""
        timeout = self._options.events_timeout_s
        while not self._stopping:
            started, received = time.monotonic(), 0
            try:
                async for item in source(timeout):
                    received += 1
                    sink(json.loads(item) if isinstance(item, str | bytes) else item)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reading TensorRT-LLM's events or stats failed; retrying")
            if not received and time.monotonic() - started < timeout / 2:
                await asyncio.sleep(timeout)  # the source does not wait: do not spin


def _abort_result(result: Any) -> None:
    """Cancel a request in the library; one already finished or gone is fine."""
    with contextlib.suppress(Exception):
        result.abort()
