"""`kvmesh.v1.Generation`: the request flow of the mesh.

    tokenize -> validate -> choose a decode worker D (planning.py: cache- and load-aware)
    D would compute enough prompt tokens, and a prefill worker exists?  (conditional disagg.)
      yes: choose P; Prefill on P (retried on another P on failure) -> stream the first token
           at once -> Decode on D with P's KvHandle (D reads the blocks it lacks over NIXL)
      no:  Decode on D without a handle (D prefills locally)
    D cannot read P's KV layout (FAILED_PRECONDITION): Decode on D again without the handle
    D fails mid-stream: migrate to another D with prompt + tokens so far (no duplicates, no gaps)

Before any of it, admission (admission.py): with no decode worker the request waits for one
(wake on request) or, when the caller can spill to another cluster, is refused at once, as it
is when this router is saturated. A request resumed from another cluster (`resume_token_ids`)
goes the way of a migration: D computes prompt + the resumed tokens and continues after them.

Cancellation propagates: when the client goes away this handler is cancelled, which cancels
the worker call in flight; a KV lease nobody will read is released at once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from kvmesh.api.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from kvmesh.errors import InvalidRequestError, ModelNotFoundError
from kvmesh.kv.hashing import tenant_salt
from kvmesh.rpc.errors import RpcCallError, UnavailableError, from_rpc_error
from kvmesh.rpc.spill import wants_spill
from kvmesh.sampling import SamplingParams
from kvmesh.telemetry import metrics
from kvmesh.text import Tokenizer
from kvmesh.validation import validate_request
from kvmesh.worker import convert
from services.router.admission import Admission
from services.router.args import RouterConfig
from services.router.outliers import RetryBudget
from services.router.planning import Plan, Planner
from services.router.pool import WorkerPool
from services.router.stream import PREFILL, RequestStream

log = structlog.get_logger(__name__)

# A decode worker failing with these is abandoned and the request migrates to another one.
_MIGRATABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(
        self,
        config: RouterConfig,
        pool: WorkerPool,
        tokenizer: Tokenizer | None,
        model_id: str,
        planner: Planner,
        admission: Admission | None = None,
    ) -> None:
        self._config = config
        self._pool = pool
        self._planner = planner
        self._admission = admission or Admission(
            pool,
            None,
            saturation_in_flight=config.saturation_in_flight,
            wake_timeout_s=config.wake_timeout_s,
        )
        self._tokenizer = tokenizer
        self._model_id = model_id
        self._background: set[asyncio.Task[None]] = set()
        admission_ = self._admission
        self._retries = RetryBudget(
            in_flight=lambda: admission_.in_flight,
            budget_share=config.retry_budget_share,
            min_retries=config.retry_budget_min,
        )
        paths = ("aggregated", "disaggregated", "resumed")
        metrics.zero(metrics.ROUTER_REQUESTS, *((p, o) for p in paths for o in ("ok", "error")))

    async def ListModels(self, request: Any, context: Any) -> generation_pb2.ListModelsResponse:
        decode = self._pool.workers("decode")
        model = generation_pb2.ModelInfo(
            id=self._model_id,
            max_model_len=min((w.info.max_model_len for w in decode if w.info), default=0),
            num_prefill_workers=len(self._pool.workers("prefill")),
            num_decode_workers=len(decode),
        )
        return generation_pb2.ListModelsResponse(models=[model])

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        if request.model and request.model not in (self._model_id, self._config.model):
            raise ModelNotFoundError(f"model {request.model!r} is not served here")
        request_id = request.request_id or _current_request_id()
        prompt = await asyncio.to_thread(self._tokenize, request)  # off the event loop
        sampling = convert.sampling_from_proto(
            request.sampling, default_max_tokens=self._config.default_max_tokens
        )
        if sampling.stop and self._tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this model has none here")
        spill = wants_spill(context.invocation_metadata() if context is not None else None)
        async with self._admission.admitted(spill=spill):
            vocab_size, max_model_len = self._limits()
            validate_request(prompt, sampling, vocab_size=vocab_size, max_model_len=max_model_len)
            resumed = list(request.resume_token_ids)
            validate_resumed(resumed, sampling, vocab_size=vocab_size)
            stream = RequestStream(
                request_id,
                prompt,
                sampling,
                self._tokenizer,
                return_token_ids=request.return_token_ids,
                cache_salt=tenant_salt(request.tenant, request.cache_salt),
                model=self._model_id,
            )
            if context is not None:
                context.add_done_callback(lambda _: stream.cancel_calls())
            async for response in self._generate(stream, resumed):
                yield response

    async def _generate(
        self, stream: RequestStream, resumed: list[int]
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        if resumed:
            # Like a migration: the decode worker computes prompt + resumed tokens itself.
            plan = self._planner.plan(stream.prompt + resumed, salt=stream.cache_salt)
            plan.prefill = None
            finished = stream.resume(resumed)
            if finished is not None:  # the resumed text already holds a stop string
                yield finished
                return
        else:
            plan = self._planner.plan(stream.prompt, salt=stream.cache_salt)
        handle: common_pb2.KvHandle | None = None
        path = "resumed" if resumed else "aggregated"
        try:
            if plan.prefill is not None:
                prefilled = await self._prefill(stream, plan)
                if prefilled is not None:
                    path = "disaggregated"
                    stream.first_tier = PREFILL
                    first = stream.add(
                        [prefilled.first_token_id],
                        [prefilled.first_logprob] if prefilled.HasField("first_logprob") else [],
                        prefilled.finish_reason,
                        prefilled.stop_reason,
                    )
                    if first is not None:
                        yield first
                    if prefilled.HasField("kv_handle"):
                        handle = prefilled.kv_handle
            if not stream.finished:
                async for response in self._decode(stream, handle, plan):
                    handle = None  # handed to a decode worker, which releases it
                    yield response
                handle = None
            metrics.ROUTER_REQUESTS.labels(path, "ok").inc()
        except BaseException:
            metrics.ROUTER_REQUESTS.labels(path, "error").inc()
            raise
        finally:
            if handle is not None:  # prefilled KV nobody will read: free it now
                self._spawn(self._release(handle))

    async def ExplainRoute(
        self, request: generation_pb2.GenerateRequest, context: Any
    ) -> generation_pb2.RouteExplanation:
        """Where Generate would send this request now, with every candidate's numbers."""
        prompt = await asyncio.to_thread(self._tokenize, request)  # off the event loop
        salt = tenant_salt(request.tenant, request.cache_salt)
        plan = self._planner.plan(prompt, salt=salt, record=False)
        explanation = generation_pb2.RouteExplanation(
            policy=self._planner.policy,
            prompt_tokens=len(prompt),
            prompt_blocks=len(plan.hashes),
            disaggregated=plan.prefill is not None,
        )
        index = self._pool.index
        for tier, decision in (
            (common_pb2.TIER_DECODE, plan.decode),
            (common_pb2.TIER_PREFILL, plan.prefill),
        ):
            if decision is None:
                continue
            explanation.decisions.append(
                generation_pb2.TierDecision(
                    tier=tier,
                    reason=decision.reason,
                    candidates=[
                        generation_pb2.RouteCandidate(
                            worker_id=c.worker.worker_id,
                            cached_blocks=c.cached_blocks,
                            new_tokens=c.new_tokens,
                            load_tokens=c.load_tokens,
                            in_flight=c.in_flight,
                            cost=c.cost,
                            eligible=c.eligible,
                            chosen=c.chosen,
                            index_mode=index.mode(c.worker.worker_id),
                        )
                        for c in decision.candidates
                    ],
                )
            )
        return explanation

    # -- the steps ---------------------------------------------------------------------------------

    async def _prefill(
        self, stream: RequestStream, plan: Plan
    ) -> worker_pb2.PrefillResponse | None:
        """Prefill on the planned worker, retrying others; None: fall back to aggregated."""
        tried: set[str] = set()
        request = worker_pb2.PrefillRequest(
            request_id=stream.request_id,
            prompt_token_ids=stream.prompt,
            sampling=convert.sampling_to_proto(stream.sampling),
            cache_salt=stream.cache_salt,
        )
        assert plan.prefill is not None
        decision = plan.prefill
        for attempt in range(1 + self._config.prefill_retries):
            if attempt:
                decision = self._planner.again(plan, "prefill", exclude=tried)
            chosen = decision.chosen
            if chosen is None:
                return None
            if attempt and not self._retries.acquire():
                log.warning("prefill retry refused: the retry budget is spent; going aggregated")
                return None
            worker = chosen.worker
            tried.add(worker.worker_id)
            worker.begin(chosen.new_tokens)
            started = asyncio.get_running_loop().time()
            try:
                response: worker_pb2.PrefillResponse = await worker.prefill.Prefill(
                    request, timeout=self._config.prefill_timeout_s
                )
                stream.prefill_s = asyncio.get_running_loop().time() - started
                stream.cached_prompt_tokens = response.num_cached_tokens
                self._pool.outliers.record(
                    worker.worker_id, "prefill", ok=True, seconds=stream.prefill_s
                )
                return response
            except grpc.aio.AioRpcError as e:
                if e.code() not in _MIGRATABLE | {grpc.StatusCode.DEADLINE_EXCEEDED}:
                    raise from_rpc_error(e) from e
                _count_engine_failure(stream, e)
                self._pool.outliers.record(worker.worker_id, "prefill", ok=False)
                metrics.ROUTER_PREFILL_RETRIES.inc()
                log.warning(
                    "prefill failed; trying another worker",
                    worker_id=worker.worker_id,
                    attempt=attempt,
                    error=e.details(),
                )
            finally:
                worker.end(chosen.new_tokens)
                if attempt:
                    self._retries.release()
        return None

    async def _decode(
        self, stream: RequestStream, handle: common_pb2.KvHandle | None, plan: Plan
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        failed: set[str] = set()
        decision = plan.decode
        while True:
            if failed:
                decision = self._planner.again(plan, "decode", exclude=failed)
            if decision.chosen is None:
                raise UnavailableError("no decode worker is available")
            retrying = bool(failed)
            if retrying and not self._retries.acquire():
                raise UnavailableError("decode failed and the router's retry budget is spent")
            worker = decision.chosen.worker
            request = worker_pb2.DecodeRequest(
                request_id=stream.request_id,
                prompt_token_ids=stream.prompt,
                generated_token_ids=stream.generated,
                sampling=convert.sampling_to_proto(stream.sampling),
                cache_salt=stream.cache_salt,
            )
            if handle is not None:
                request.kv_handle.CopyFrom(handle)
            worker.begin()
            call = worker.decode.Decode(request)
            stream.calls.add(call)
            started, tokens = asyncio.get_running_loop().time(), 0
            try:
                first = True
                async for message in call:
                    tokens += len(message.token_ids)
                    if first and handle is None:  # aggregated: the decode worker prefilled
                        stream.cached_prompt_tokens = max(
                            stream.cached_prompt_tokens, message.num_cached_tokens
                        )
                    first = False
                    response = stream.add(
                        message.token_ids,
                        message.logprobs,
                        message.finish_reason,
                        message.stop_reason,
                    )
                    if stream.finished:
                        elapsed = asyncio.get_running_loop().time() - started
                        self._pool.outliers.record(
                            worker.worker_id, "decode", ok=True, seconds=elapsed / max(tokens, 1)
                        )
                    if response is not None:
                        yield response
                    if stream.finished:
                        return
                raise _StreamEnded()
            except (grpc.aio.AioRpcError, _StreamEnded) as e:
                if (
                    isinstance(e, grpc.aio.AioRpcError)
                    and e.code() == grpc.StatusCode.FAILED_PRECONDITION
                    and handle is not None
                    and first
                ):
                    # The handle is refused (a layout D cannot read, or a stale lease): D
                    # computes the prompt itself, and the lease nobody will read is freed.
                    log.warning(
                        "decode worker refused the KV handle; decoding there without it",
                        worker_id=worker.worker_id,
                        prefill_worker=handle.worker_id,
                        error=e.details(),
                    )
                    self._spawn(self._release(handle))
                    handle = None
                    continue
                if isinstance(e, grpc.aio.AioRpcError):
                    if e.code() not in _MIGRATABLE:
                        raise from_rpc_error(e) from e
                    _count_engine_failure(stream, e)
                self._pool.outliers.record(worker.worker_id, "decode", ok=False)
                failed.add(worker.worker_id)
                handle = None  # the new worker prefills prompt + tokens so far itself
                stream.migrations += 1
                if stream.migrations > self._config.max_migrations:
                    raise UnavailableError("decode failed on every worker tried") from e
                metrics.ROUTER_MIGRATIONS.inc()
                log.warning(
                    "decode worker failed mid-stream; migrating",
                    worker_id=worker.worker_id,
                    generated=len(stream.generated),
                    error=str(e.details() if isinstance(e, grpc.aio.AioRpcError) else e),
                )
            finally:
                call.cancel()
                stream.calls.discard(call)
                worker.end()
                if retrying:
                    self._retries.release()

    # -- helpers -----------------------------------------------------------------------------------

    def _tokenize(self, request: generation_pb2.GenerateRequest) -> list[int]:
        which = request.WhichOneof("input")
        if which == "token_ids":
            return list(request.token_ids.ids)
        if which not in ("text", "chat"):
            raise InvalidRequestError("one of text, chat or token_ids is required")
        tokenizer = self._tokenizer
        if tokenizer is None:
            raise InvalidRequestError(
                f"model {self._model_id!r} has no tokenizer here: send token_ids, not {which}"
            )
        if which == "text":
            return tokenizer.encode(request.text, add_special_tokens=True)
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        if not messages:
            raise InvalidRequestError("messages must not be empty")
        try:
            return tokenizer.apply_chat_template(messages)  # type: ignore[arg-type]
        except Exception as e:  # the template rejects what it cannot render
            raise InvalidRequestError(f"cannot apply the chat template: {e}") from e

    def _limits(self) -> tuple[int, int]:
        infos = [w.info for w in self._pool.workers("decode") if w.info is not None]
        if not infos:
            raise UnavailableError("no decode worker is available")
        return min(i.vocab_size for i in infos), min(i.max_model_len for i in infos)

    async def _release(self, handle: common_pb2.KvHandle) -> None:
        worker = next(
            (w for w in self._pool.workers("prefill") if w.worker_id == handle.worker_id), None
        )
        if worker is None:
            return
        stub = worker_pb2_grpc.KvTransferStub(worker.channel)
        try:
            await stub.ReleaseLease(
                worker_pb2.ReleaseLeaseRequest(
                    request_id=handle.request_id, release_token=handle.release_token
                ),
                timeout=5,
            )
        except grpc.aio.AioRpcError as e:
            log.warning("lease release failed; it will expire", error=e.details())

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _StreamEnded(RpcCallError):
    """A decode stream closed without a finished message (its worker went away)."""

    def __init__(self) -> None:
        super().__init__("decode stream ended before the request finished")


def validate_resumed(resumed: list[int], sampling: SamplingParams, *, vocab_size: int) -> None:
    """`resume_token_ids` must be in the vocabulary and leave at least one token to generate."""
    bad = [t for t in resumed if t >= vocab_size]
    if bad:
        raise InvalidRequestError(
            f"resume_token_ids has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}"
        )
    if len(resumed) >= sampling.max_tokens:
        raise InvalidRequestError(
            f"resume_token_ids has {len(resumed)} tokens; it must be shorter than max_tokens "
            f"({sampling.max_tokens})"
        )


MAX_ENGINE_FAILURES = 2  # workers whose engine may fail one request: it moves on once


def _count_engine_failure(stream: RequestStream, error: grpc.aio.AioRpcError) -> None:
    """A worker's engine failed this request (INTERNAL): it may be the request itself (a poison
    request fails alone; the rest of its batch goes on), so it is tried on one more worker and
    then fails, rather than take batch after batch down with it."""
    if error.code() != grpc.StatusCode.INTERNAL:
        return
    stream.engine_failures += 1
    if stream.engine_failures >= MAX_ENGINE_FAILURES:
        log.error(
            "the request failed in the engine of two workers; failing it",
            request_id=stream.request_id,
            error=error.details(),
        )
        raise from_rpc_error(error) from error


def _current_request_id() -> str:
    bound = structlog.contextvars.get_contextvars().get("request_id")
    return str(bound) if bound else uuid.uuid4().hex
