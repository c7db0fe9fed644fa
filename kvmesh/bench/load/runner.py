"""Running a configured load against a target: `run(config) -> BenchResult`.

The order of things: check the configuration, make the workload's sessions, check the target
is reachable and pick the model, then send. Open loop starts each session at its arrival time,
whether or not earlier requests have finished (only the `max_in_flight` cap can hold one back,
and each hold is counted); closed loop keeps `concurrency` sessions going. Within a session
turns are sequential. Each request has a time limit; a request that fails is recorded with its
message and the run goes on. A `stop` event (Ctrl-C on the CLI) ends the run early: requests in
flight are cancelled, and what had finished is summarized, marked interrupted.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import structlog

from kvmesh.bench.load.arrivals import OpenLoop, arrival_offsets
from kvmesh.bench.load.config import DEFAULT_TOKENIZER_MODEL, BenchConfig
from kvmesh.bench.load.errors import ConfigError, RequestFailedError, TargetError
from kvmesh.bench.load.metrics import BenchResult, RequestRecord, spread_tokens, summarize
from kvmesh.bench.load.progress import Progress
from kvmesh.bench.load.speculation import difference, read_counters
from kvmesh.bench.load.targets import Prompt, Target, Usage, open_target
from kvmesh.bench.load.workloads import Session, TokenRange, build, stand_in_answer, truncate
from kvmesh.text import Tokenizer

log = structlog.get_logger(__name__)


def run(config: BenchConfig, *, handle_sigint: bool = False) -> BenchResult:
    """Run to the end and return the result (blocking; starts its own event loop).

    With `handle_sigint`, a first Ctrl-C stops the run and keeps what finished; a second one
    cancels at once (`asyncio.CancelledError`).
    """
    if handle_sigint:
        return asyncio.run(_run_until_sigint(config))
    return asyncio.run(run_async(config))


async def run_async(config: BenchConfig, *, stop: asyncio.Event | None = None) -> BenchResult:
    config.validate()
    tokenizer = _load_tokenizer(config)
    tokens = config.tokens
    if tokenizer is not None:
        tokens = replace(tokens, high=min(tokens.high, tokenizer.vocab_size))
    sessions = build(config.workload, config.seed, tokens)
    if config.num_requests is not None:
        sessions = truncate(sessions, config.num_requests)
    target = open_target(
        config.protocol,
        config.target,
        max_connections=config.max_in_flight,
        api_key=config.api_key,
    )
    speculation = None
    try:
        model = await _resolve_model(target, config.model)
        log.info("bench starting", target=target.description, model=model)
        if config.worker_metrics:
            counted = await read_counters(config.worker_metrics)
        load = _Load(config, target, model, tokenizer, tokens)
        interrupted = await load.drive(sessions, stop or asyncio.Event())
        if config.worker_metrics:
            speculation = difference(counted, await read_counters(config.worker_metrics))
    finally:
        await target.aclose()
    records = sorted(load.records, key=lambda r: r.index)
    summary = summarize(
        records,
        duration_s=load.duration_s,
        slo=config.slo,
        in_flight_cap_hits=load.cap_hits,
        interrupted=interrupted,
    )
    return BenchResult(config, model, target.description, summary, records, speculation)


async def _run_until_sigint(config: BenchConfig) -> BenchResult:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main = asyncio.current_task()

    def on_sigint() -> None:
        if stop.is_set() and main is not None:
            main.cancel()
        stop.set()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        return await run_async(config, stop=stop)
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _load_tokenizer(config: BenchConfig) -> Tokenizer | None:
    if config.prompt_format != "text":
        return None
    from kvmesh.errors import EngineError
    from kvmesh.text import load_tokenizer

    path = config.tokenizer
    if path is None:
        from kvmesh import models

        try:
            path = str(models.resolve(DEFAULT_TOKENIZER_MODEL).tokenizer_dir)
        except EngineError as e:
            raise ConfigError(f"no default tokenizer ({e}); give --tokenizer DIR") from e
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer at {path}: {e}") from e


async def _resolve_model(target: Target, model: str | None) -> str:
    """The model to ask for; listing the models is also the check that the target answers."""
    try:
        models = await target.list_models()
    except TargetError as e:
        if model is not None and type(e) is TargetError:
            return model  # reachable, just no model list (not every server has one)
        raise
    if model is not None:
        return model
    if not models:
        raise TargetError(f"{target.description} lists no models; give --model")
    return models[0]


class _Load:
    """One run's sending, timing and bookkeeping."""

    def __init__(
        self,
        config: BenchConfig,
        target: Target,
        model: str,
        tokenizer: Tokenizer | None,
        tokens: TokenRange,
    ) -> None:
        self._config = config
        self._target = target
        self._model = model
        self._tokenizer = tokenizer
        self._tokens = tokens
        self._cap = asyncio.Semaphore(config.max_in_flight)
        self._start = self._last_end = time.perf_counter()
        self._next_index = 0
        self._progress: Progress | None = None
        self.cap_hits = 0
        self.records: list[RequestRecord] = []

    @property
    def duration_s(self) -> float:
        end = self._last_end if self.records else time.perf_counter()
        return end - self._start

    async def drive(self, sessions: Sequence[Session], stop: asyncio.Event) -> bool:
        """Send everything (or until `stop`); True when stopped early."""
        self._start = time.perf_counter()
        total = sum(len(s.turns) for s in sessions)
        self._progress = Progress(total, enabled=self._config.progress)
        arrivals = self._config.arrivals
        if isinstance(arrivals, OpenLoop):
            offsets = arrival_offsets(arrivals, len(sessions), self._config.seed)
            work = asyncio.create_task(self._open_loop(sessions, offsets))
        else:
            work = asyncio.create_task(self._closed_loop(sessions, arrivals.concurrency))
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait((work, stopped), return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                work.result()  # a bug in the runner surfaces here
                return False
            return True
        finally:
            await _cancel(work, stopped)
            self._progress.close()

    async def _open_loop(self, sessions: Sequence[Session], offsets: Sequence[float]) -> None:
        tasks: list[asyncio.Task[None]] = []
        try:
            for session, offset in zip(sessions, offsets, strict=True):
                delay = self._start + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self._expired():
                    break
                tasks.append(asyncio.create_task(self._session(session)))
            await asyncio.gather(*tasks)
        finally:
            await _cancel(*tasks)

    async def _closed_loop(self, sessions: Sequence[Session], concurrency: int) -> None:
        queue = iter(sessions)  # shared: each session is taken by one worker

        async def worker() -> None:
            for session in queue:
                if self._expired():
                    return
                await self._session(session)

        workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(sessions)))]
        try:
            await asyncio.gather(*workers)
        finally:
            await _cancel(*workers)

    def _expired(self) -> bool:
        limit = self._config.duration_s
        return limit is not None and time.perf_counter() - self._start >= limit

    async def _session(self, session: Session) -> None:
        context: list[int] = []
        for turn_index, turn in enumerate(session.turns):
            if self._expired():
                return
            prompt = context + list(turn.new_tokens)
            record, answer = await self._request(session, turn_index, prompt, turn.max_tokens)
            context = prompt
            if session.include_answers:
                if not (record.ok and len(answer) == record.completion_tokens):
                    length = record.completion_tokens if record.ok else turn.max_tokens
                    answer = stand_in_answer(
                        self._config.seed, session, turn_index, length, self._tokens
                    )
                context += answer

    async def _request(
        self, session: Session, turn: int, prompt: list[int], max_tokens: int
    ) -> tuple[RequestRecord, list[int]]:
        """Send one request (after the in-flight cap lets it); its record and answer ids."""
        sendable: Prompt = prompt if self._tokenizer is None else self._tokenizer.decode(prompt)
        index, self._next_index = self._next_index, self._next_index + 1
        if self._cap.locked():
            if self.cap_hits == 0:
                log.warning("max in-flight reached; requests wait", cap=self._config.max_in_flight)
            self.cap_hits += 1
        ready = time.perf_counter()
        async with self._cap:
            sent = time.perf_counter()
            record = RequestRecord(
                index=index,
                session=session.session_id,
                turn=turn,
                group=session.group,
                prompt_len=len(prompt),
                max_tokens=max_tokens,
                sent_s=sent - self._start,
                queued_s=sent - ready,
            )
            assert self._progress is not None
            self._progress.sent()
            answer: list[int] = []
            try:
                await asyncio.wait_for(
                    self._stream(record, sendable, sent, answer), self._config.request_timeout_s
                )
            except asyncio.TimeoutError:
                record.error = f"timed out after {self._config.request_timeout_s:g} s"
            except RequestFailedError as e:
                record.error = str(e)
            except Exception as e:  # an unmapped library error: a failed request, not a crash
                log.warning("request failed unexpectedly", exc_info=True)
                record.error = f"{type(e).__name__}: {e}"
        self._last_end = time.perf_counter()
        self.records.append(record)
        self._progress.finished(ok=record.ok)
        return record, answer

    async def _stream(
        self, record: RequestRecord, prompt: Prompt, sent: float, answer: list[int]
    ) -> None:
        usage: Usage | None = None
        counted = True  # every chunk said how many tokens it holds
        async for event in self._target.generate(self._model, prompt, record.max_tokens):
            now = time.perf_counter()
            if isinstance(event, Usage):
                usage = event
                continue
            record.chunk_offsets_s.append(now - sent)
            record.chunk_tokens.append(event.num_tokens or 0)
            counted = counted and event.num_tokens is not None
            answer += event.token_ids
        record.e2e_s = time.perf_counter() - sent
        if usage is not None:
            record.prompt_tokens = usage.prompt_tokens
            record.cached_tokens = usage.cached_tokens
        if not counted:
            total = usage.completion_tokens if usage else len(record.chunk_offsets_s)
            record.chunk_tokens = spread_tokens(len(record.chunk_offsets_s), total)
        record.completion_tokens = usage.completion_tokens if usage else sum(record.chunk_tokens)


async def _cancel(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
