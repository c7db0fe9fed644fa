"""The fake LLM: a toy model, a prefix cache with events, iteration stats, and a cache
transceiver that moves "KV" between processes through files (see the package docstring)."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorrt_llm.disaggregated_params import DisaggregatedParams
from tensorrt_llm.executor.utils import RequestError

TRANSCEIVER_BACKENDS = ("DEFAULT", "UCX", "NIXL", "MPI")
COMM_MAGIC = b"fake-comm/v1:"
DEFAULT_VOCAB = 1024
DEFAULT_NUM_BLOCKS = 4096


@dataclass(kw_only=True)
class KvCacheConfig:
    enable_block_reuse: bool = True
    max_tokens: int | None = None
    free_gpu_memory_fraction: float | None = 0.9
    event_buffer_max_size: int = 0
    tokens_per_block: int = 32

    def __post_init__(self) -> None:
        fraction = self.free_gpu_memory_fraction
        if fraction is not None and not 0 <= fraction <= 1:
            raise ValueError("free_gpu_memory_fraction must be in [0, 1]")
        if self.event_buffer_max_size < 0:
            raise ValueError("event_buffer_max_size must be >= 0")


@dataclass(kw_only=True)
class CacheTransceiverConfig:
    backend: str | None = None
    max_tokens_in_buffer: int | None = None

    def __post_init__(self) -> None:
        if self.backend is not None and self.backend not in TRANSCEIVER_BACKENDS:
            raise ValueError(f"backend must be one of {TRANSCEIVER_BACKENDS}, got {self.backend!r}")


@dataclass(kw_only=True)
class SamplingParams:
    max_tokens: int = 32
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    end_id: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    disaggregated_params: DisaggregatedParams | None = None


class RequestOutput:
    """One request's output, updated in place; `async for` yields it after each update
    (streaming) or once, finished (not streaming)."""

    def __init__(self, llm: LLM, request_id: int, prompt: list[int], streaming: bool) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt
        self.outputs = [CompletionOutput(index=0)]
        self.finished = False
        self._llm = llm
        self._streaming = streaming
        self._updates: asyncio.Queue[None] = asyncio.Queue()
        self._error: str | None = None
        self._delivered_final = False
        self._task: asyncio.Task[None] | None = None

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._delivered_final:
                raise StopAsyncIteration
            await self._updates.get()
            if self._error is not None:
                self._delivered_final = True
                raise RequestError(self._error)
            if self.finished:
                self._delivered_final = True
                return self
            if self._streaming:
                return self

    async def aresult(self) -> RequestOutput:
        async for _ in self:
            pass
        return self

    def abort(self) -> None:
        self._llm._abort(self)

    def _update(self) -> None:
        self._updates.put_nowait(None)


class _Drain:
    """What `get_kv_cache_events_async` / `get_stats_async` return: the queued items, waiting
    up to `timeout` for the first; ends when none came in time."""

    def __init__(self, queue: collections.deque[Any], wake: asyncio.Event, timeout: float) -> None:
        self._queue, self._wake, self._timeout = queue, wake, timeout

    def __aiter__(self) -> _Drain:
        return self

    async def __anext__(self) -> Any:
        if not self._queue:
            self._wake.clear()
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=self._timeout)
            finally:
                waiter.cancel()
        if not self._queue:
            raise StopAsyncIteration
        return self._queue.popleft()


class LLM:
    def __init__(
        self,
        model: str,
        *,
        backend: str = "pytorch",
        tensor_parallel_size: int = 1,
        max_batch_size: int | None = None,
        max_num_tokens: int | None = None,
        max_seq_len: int | None = None,
        enable_iter_perf_stats: bool = False,
        kv_cache_config: KvCacheConfig | None = None,
        cache_transceiver_config: CacheTransceiverConfig | None = None,
    ) -> None:
        if backend != "pytorch":
            raise ValueError(f"the fake runs backend 'pytorch' only, got {backend!r}")
        if tensor_parallel_size != 1:
            raise ValueError("the fake has one GPU")
        self.vocab_size, model_len = _read_model(model)
        self.max_seq_len = max_seq_len or model_len
        self.max_batch_size = max_batch_size or 64
        self.kv = kv_cache_config or KvCacheConfig()
        self.transceiver = cache_transceiver_config
        self.block_size = self.kv.tokens_per_block
        self.num_blocks = (
            self.kv.max_tokens // self.block_size if self.kv.max_tokens else DEFAULT_NUM_BLOCKS
        )
        self.enable_iter_perf_stats = enable_iter_perf_stats
        self.step_s = float(os.environ.get("TRTLLM_FAKE_STEP_S", "0.002"))
        fail = os.environ.get("TRTLLM_FAKE_FAIL_ON_TOKEN")
        self.fail_on_token = int(fail) if fail else None
        self.endpoint = Path(tempfile.gettempdir()) / "tensorrt_llm_fake" / uuid.uuid4().hex
        self.endpoint.mkdir(parents=True)
        self._ids = itertools.count(1)
        self._active: dict[int, RequestOutput] = {}
        self._pending: dict[int, Path] = {}  # context-only results whose KV waits for its reader
        self._cache: collections.OrderedDict[int, int] = collections.OrderedDict()  # hash -> len
        self._events: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=self.kv.event_buffer_max_size or 1
        )
        self._stats: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self._event_ids = itertools.count()
        self._iter = itertools.count()
        self._reused = self._missed = 0
        self._events_wake: asyncio.Event | None = None
        self._stats_wake: asyncio.Event | None = None
        self._emit({"type": "created", "num_blocks_per_cache_level": [self.num_blocks, 0]})

    # -- the documented API --------------------------------------------------------------------

    def generate_async(
        self,
        inputs: list[int],
        sampling_params: SamplingParams | None = None,
        *,
        streaming: bool = False,
        disaggregated_params: DisaggregatedParams | None = None,
    ) -> RequestOutput:
        prompt = list(inputs)
        sampling = sampling_params or SamplingParams()
        if not prompt:
            raise ValueError("the prompt must not be empty")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        if len(prompt) + sampling.max_tokens > self.max_seq_len:
            raise ValueError(
                f"The sum of prompt length ({len(prompt)}) and max_tokens "
                f"({sampling.max_tokens}) should not exceed max_seq_len ({self.max_seq_len})"
            )
        kind = disaggregated_params.request_type if disaggregated_params else None
        if kind in ("context_only", "generation_only") and self.transceiver is None:
            raise ValueError("disaggregated requests need a cache_transceiver_config")
        if kind == "generation_only":
            params = disaggregated_params
            assert params is not None
            if not params.first_gen_tokens or params.ctx_request_id is None:
                raise ValueError("generation_only requests need first_gen_tokens, ctx_request_id")
        result = RequestOutput(self, next(self._ids), prompt, streaming)
        self._active[result.request_id] = result
        result._task = asyncio.get_running_loop().create_task(
            self._run(result, sampling, disaggregated_params)
        )
        result._task.add_done_callback(lambda _: self._cancelled_unstarted(result))
        return result

    def get_kv_cache_events_async(self, timeout: float | None = 2) -> _Drain:
        if self._events_wake is None:
            self._events_wake = asyncio.Event()
        return _Drain(self._events, self._events_wake, timeout or 0)

    def get_stats_async(self, timeout: float | None = 2) -> _Drain:
        if self._stats_wake is None:
            self._stats_wake = asyncio.Event()
        return _Drain(self._stats, self._stats_wake, timeout or 0)

    def shutdown(self) -> None:
        """Callable from any thread, as the real one is (it joins its executor's workers)."""
        for result in list(self._active.values()):
            task = result._task
            if task is not None and not task.get_loop().is_closed():
                task.get_loop().call_soon_threadsafe(task.cancel)
        shutil.rmtree(self.endpoint, ignore_errors=True)

    # -- the engine ----------------------------------------------------------------------------

    async def _run(
        self, result: RequestOutput, sampling: SamplingParams, params: DisaggregatedParams | None
    ) -> None:
        out = result.outputs[0]
        kind = params.request_type if params else None
        try:
            if kind == "generation_only":
                assert params is not None
                self._receive_kv(result.prompt_token_ids, params)
                out.token_ids.extend(params.first_gen_tokens or [])
            else:
                self._lookup(result.prompt_token_ids)
            while not self._finish(result, sampling):
                await asyncio.sleep(self.step_s)
                if self.fail_on_token in result.prompt_token_ids and out.token_ids:
                    raise RequestError(f"fake executor failure on request {result.request_id}")
                context = [*result.prompt_token_ids, *out.token_ids]
                out.token_ids.append((context[-1] + 1) % self.vocab_size)
                self._record_iteration()
                result._update()
            if kind == "context_only":
                out.disaggregated_params = self._send_kv(result)
            if kind != "generation_only":
                self._store([*result.prompt_token_ids, *out.token_ids])
        except asyncio.CancelledError:
            out.finish_reason = "cancelled"
            result.finished = True
        except RequestError as e:
            result._error = str(e)
        finally:
            self._active.pop(result.request_id, None)
            self._record_iteration()
            result._update()

    def _finish(self, result: RequestOutput, sampling: SamplingParams) -> bool:
        out = result.outputs[0]
        if out.token_ids:
            last = out.token_ids[-1]
            ends = set(sampling.stop_token_ids or ())
            if sampling.end_id is not None and not sampling.ignore_eos:
                ends.add(sampling.end_id)
            if last in ends:
                out.finish_reason, out.stop_reason = "stop", last
            elif len(out.token_ids) >= sampling.max_tokens:
                out.finish_reason = "length"
        result.finished = out.finish_reason is not None
        return result.finished

    def _cancelled_unstarted(self, result: RequestOutput) -> None:
        """A request aborted before its task ran still ends, cancelled."""
        if not result.finished and result._error is None:
            result.outputs[0].finish_reason = "cancelled"
            result.finished = True
            self._active.pop(result.request_id, None)
            result._update()

    def _abort(self, result: RequestOutput) -> None:
        if result._task is not None and not result._task.done():
            result._task.cancel()
        path = self._pending.pop(result.request_id, None)
        if path is not None:
            path.unlink(missing_ok=True)

    # -- the cache transceiver -----------------------------------------------------------------

    def _send_kv(self, result: RequestOutput) -> DisaggregatedParams:
        nonce = uuid.uuid4().hex
        path = self.endpoint / f"{result.request_id}.json"
        first = result.outputs[0].token_ids[:1]
        state = {"prompt": result.prompt_token_ids, "first_gen_tokens": first, "nonce": nonce}
        path.write_text(json.dumps(state))
        self._pending[result.request_id] = path
        assert self.transceiver is not None
        comm = {"endpoint": str(self.endpoint), "backend": self.transceiver.backend, "nonce": nonce}
        return DisaggregatedParams(
            request_type="context_only",
            first_gen_tokens=first,
            ctx_request_id=result.request_id,
            opaque_state=COMM_MAGIC + json.dumps(comm).encode(),
            draft_tokens=None,
        )

    def _receive_kv(self, prompt: list[int], params: DisaggregatedParams) -> None:
        opaque = params.opaque_state or b""
        try:
            if not opaque.startswith(COMM_MAGIC):
                raise ValueError("not a cache transceiver state")
            comm = json.loads(opaque[len(COMM_MAGIC) :])
            path = Path(comm["endpoint"]) / f"{params.ctx_request_id}.json"
            state = json.loads(path.read_text())
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise RequestError(
                f"Failed to receive the KV cache of context request {params.ctx_request_id}: {e}"
            ) from e
        if state["nonce"] != comm["nonce"] or state["prompt"] != prompt:
            raise RequestError("the received KV cache belongs to another request")
        if state["first_gen_tokens"] != list(params.first_gen_tokens or ()):
            raise RequestError("first_gen_tokens differ from the context request's")
        path.unlink()  # moved: the context side's blocks are free
        record = os.environ.get("TRTLLM_FAKE_RECORD")
        if record:
            with open(record, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "ctx_request_id": params.ctx_request_id,
                            "num_tokens": len(prompt),
                            "num_transferred_blocks": -(-len(prompt) // self.block_size),
                            "backend": comm["backend"],
                            "pid": os.getpid(),
                        }
                    )
                    + "\n"
                )

    # -- the prefix cache, its events, the stats -----------------------------------------------

    def _hashes(self, tokens: list[int]) -> list[tuple[int, list[int]]]:
        hashes, parent = [], 0
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            block = tokens[start : start + self.block_size]
            digest = hashlib.blake2b(f"{parent}:{block}".encode(), digest_size=8).digest()
            parent = int.from_bytes(digest, "little") >> 1
            hashes.append((parent, block))
        return hashes

    def _lookup(self, prompt: list[int]) -> None:
        for block_hash, _ in self._hashes(prompt):
            if block_hash not in self._cache:
                self._missed += 1
                return
            self._reused += 1
            self._cache.move_to_end(block_hash)

    def _store(self, tokens: list[int]) -> None:
        if not self.kv.enable_block_reuse:
            return
        parent: int | None = None
        new: list[dict[str, Any]] = []
        new_parent: int | None = None
        for block_hash, block in self._hashes(tokens):
            if block_hash in self._cache:
                self._cache.move_to_end(block_hash)
            else:
                if not new:
                    new_parent = parent
                self._cache[block_hash] = len(block)
                new.append(_stored_block(block_hash, block))
            parent = block_hash
        if new:
            self._emit({"type": "stored", "parent_hash": new_parent, "blocks": new})
        evicted = []
        while len(self._cache) > self.num_blocks:
            evicted.append(self._cache.popitem(last=False)[0])
        if evicted:
            self._emit({"type": "removed", "block_hashes": evicted})

    def _emit(self, data: dict[str, Any]) -> None:
        if not (self.kv.enable_block_reuse and self.kv.event_buffer_max_size > 0):
            return
        self._events.append({"event_id": next(self._event_ids), "data": data, "window_size": 0})
        if self._events_wake is not None:
            self._events_wake.set()

    def _record_iteration(self) -> None:
        if not self.enable_iter_perf_stats:
            return
        active = list(self._active.values())
        used = sum(
            -(-(len(r.prompt_token_ids) + len(r.outputs[0].token_ids)) // self.block_size)
            for r in active
        )
        used += len(self._pending)
        total = self._reused + self._missed
        self._stats.append(
            {
                "iter": next(self._iter),
                "iterLatencyMS": self.step_s * 1000,
                "numActiveRequests": len(active),
                "numQueuedRequests": 0,
                "maxNumActiveRequests": self.max_batch_size,
                "kvCacheStats": {
                    "maxNumBlocks": self.num_blocks,
                    "freeNumBlocks": self.num_blocks - used,
                    "usedNumBlocks": used,
                    "tokensPerBlock": self.block_size,
                    "allocTotalBlocks": used,
                    "allocNewBlocks": used,
                    "reusedBlocks": self._reused,
                    "missedBlocks": self._missed,
                    "cacheHitRate": self._reused / total if total else 0.0,
                },
                "inflightBatchingStats": {
                    "numContextRequests": 0,
                    "numGenRequests": len(active),
                    "numCtxTokens": 0,
                    "numPausedRequests": 0,
                },
            }
        )
        if self._stats_wake is not None:
            self._stats_wake.set()


def _stored_block(block_hash: int, tokens: list[int]) -> dict[str, Any]:
    return {
        "type": "stored_block",
        "block_hash": block_hash,
        "tokens": [{"type": "unique_token", "token_id": t, "token_extra_id": 0} for t in tokens],
        "cache_level": 0,
        "priority": 35,
    }


def _read_model(model: str) -> tuple[int, int]:
    """(vocabulary, context) from a Hugging Face directory's config.json; else the toy's."""
    config = Path(model) / "config.json"
    if config.is_file():
        document = json.loads(config.read_text())
        return int(document["vocab_size"]), int(document.get("max_position_embeddings", 2048))
    return DEFAULT_VOCAB, 2048
