"""The async API over an `EngineCore` stepped by a thread of its own (torch-free).

`AsyncEngine` implements `kvmesh.engine.protocol.Engine` for any core: the torch engine and
the simulated engine are each one, over a core with their own executor.

Everything that touches the core runs on that thread, in order: the asyncio side posts commands
to it and gets results back through futures, and each step's outputs are handed to the event
loop in one callback. PyTorch releases the GIL inside its kernels, so the event loop stays
responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from kvmesh.engine.core import EngineCore, StepOutput
from kvmesh.errors import EngineError, InvalidRequestError, StoppedError
from kvmesh.kv.events import KvEventLog
from kvmesh.kv.hashing import BlockHash
from kvmesh.text.tokenizer import Tokenizer
from kvmesh.types import (
    EngineInfo,
    EngineStats,
    GenerateRequest,
    KvExport,
    KvImportPlan,
    LoadSnapshot,
    PrefillOutput,
    TokenOutput,
    TransferMode,
)

if TYPE_CHECKING:
    from kvmesh.kv.cache import PagedKvCache

log = structlog.get_logger(__name__)

T = TypeVar("T")
_E = TypeVar("_E", bound="AsyncEngine")
_StreamItem = StepOutput | BaseException


class AsyncEngine:
    """An `Engine` over a core: commands and steps on the engine thread, streams on the loop."""

    def __init__(self, core: EngineCore) -> None:
        self._core = core
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[_StreamItem]] = {}  # event-loop thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._warmed_up = threading.Event()
        self._load = self._core.load()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine thread; returns once a warm-up request has run."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kvmesh-engine", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._warmed_up.wait)

    async def stop(self) -> None:
        if self._thread is None or self._stopping:
            return
        self._stopping = True
        self._commands.put(lambda: None)  # wake the thread
        await asyncio.to_thread(self._thread.join)
        for stream in self._streams.values():
            stream.put_nowait(StoppedError("the engine stopped"))

    async def __aenter__(self: _E) -> _E:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- properties ----------------------------------------------------------------------------

    @property
    def core(self) -> EngineCore:
        """The synchronous core, for tests and benchmarks; never touch it while running."""
        return self._core

    @property
    def info(self) -> EngineInfo:
        return self._core.info

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._core.tokenizer

    @property
    def kv_events(self) -> KvEventLog:
        return self._core.kv_events

    def kv_region(self) -> PagedKvCache | None:
        """None: an engine that exposes its KV to NIXL overrides this."""
        return None

    def export_region(self) -> PagedKvCache | None:
        """`kv_region()`: an engine that exports into blocks of their own overrides this."""
        return self.kv_region()

    def load(self) -> LoadSnapshot:
        return self._load

    def stats(self) -> EngineStats:
        return replace(self._core.stats)

    # -- requests ------------------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenOutput]:
        self._check_running()
        self._core.validate(request)
        return self._stream(request.request_id, lambda: self._core.add(request))

    async def prefill(self, request: GenerateRequest) -> PrefillOutput:
        stream = self._open(request)
        self._post_for(request.request_id, lambda: self._core.add(request, prefill_only=True))
        try:
            item = await stream.get()
        except asyncio.CancelledError:
            self._post(lambda: self._deliver_abort(request.request_id))
            raise
        finally:
            self._streams.pop(request.request_id, None)
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, PrefillOutput)
        return item

    async def release_export(self, request_id: str) -> None:
        await self._call(lambda: self._core.release_export(request_id))

    async def reserve_import(self, request: GenerateRequest, export: KvExport) -> KvImportPlan:
        self._check_running()
        try:
            plan = await self._call(lambda: self._core.reserve_import(request, export))
            if self.info.transfer_mode is TransferMode.ENGINE:
                await self._core.executor.receive_kv(export, plan.blocks_to_fill)
                plan = replace(plan, filled_by_engine=True)
        except BaseException:
            self._post(lambda: self._deliver_abort(request.request_id))
            raise
        return plan

    def generate_imported(
        self, plan: KvImportPlan, first_token_id: int
    ) -> AsyncIterator[TokenOutput]:
        self._check_running()

        def start() -> None:
            out = self._core.start_import(plan.request_id, first_token_id)
            if out is not None:
                self._deliver([out])

        return self._stream(plan.request_id, start)

    async def abort(self, request_id: str) -> None:
        await self._call(lambda: self._deliver_abort(request_id))

    async def kv_snapshot(self) -> tuple[list[BlockHash], int]:
        """The prefix cache's hashes and the id of the last event they include."""

        def snapshot() -> tuple[list[BlockHash], int]:
            self._core.publish_events()
            return self._core.pool.cached_hashes(), self._core.kv_events.last_event_id

        return await self._call(snapshot)

    async def is_idle_and_whole(self) -> bool:
        """Nothing in flight or pinned and every KV block free (for tests and drains)."""
        return await self._call(self._core.is_idle_and_whole)

    # -- the asyncio side ----------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._thread is None or self._stopping:
            raise StoppedError("the engine is not running; call start() first")
        if asyncio.get_running_loop() is not self._loop:
            raise EngineError("the engine is used from another event loop than it started on")

    def _open(self, request: GenerateRequest) -> asyncio.Queue[_StreamItem]:
        self._check_running()
        self._core.validate(request)
        return self._open_stream(request.request_id)

    def _open_stream(self, request_id: str) -> asyncio.Queue[_StreamItem]:
        self._check_running()
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue[_StreamItem] = asyncio.Queue()
        self._streams[request_id] = stream
        return stream

    async def _stream(
        self, request_id: str, start: Callable[[], None]
    ) -> AsyncGenerator[TokenOutput, None]:
        """Run `start` on the engine thread and yield the request's outputs until it ends.

        Leaving early (break, cancellation, an error in the consumer) aborts the request.
        """
        stream = self._open_stream(request_id)
        self._post_for(request_id, start)
        done = False
        try:
            while not done:
                item = await stream.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                assert isinstance(item, TokenOutput)
                done = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not done and not self._stopping:
                self._post(lambda: self._deliver_abort(request_id))

    async def _call(self, fn: Callable[[], T]) -> T:
        self._check_running()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

        self._commands.put(run)
        return await asyncio.wrap_future(future)

    def _post(self, fn: Callable[[], Any]) -> None:
        self._commands.put(fn)

    def _post_for(self, request_id: str, fn: Callable[[], Any]) -> None:
        """Run `fn` on the engine thread; an error it raises goes to the request's stream."""

        def run() -> None:
            try:
                fn()
            except Exception as e:
                self._deliver_error(request_id, e)

        self._commands.put(run)

    def _on_loop(self, items: list[tuple[str, _StreamItem]]) -> None:
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(item)

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._core.warm_up()
        except Exception:
            log.exception("engine warm-up failed; serving anyway")
        self._warmed_up.set()
        while not self._stopping:
            self._run_commands(wait=not self._core.has_work)
            if self._stopping:
                break
            if self._core.has_work:
                self._step()
            self._load = self._core.load()

    def _run_commands(self, *, wait: bool) -> None:
        try:
            command = self._commands.get(block=wait)
        except queue.Empty:
            return
        while True:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        try:
            outputs = self._core.step()
        except Exception as e:
            log.exception("engine step failed")
            error = EngineError(f"engine step failed: {e!r}")
            for request_id in self._core.fail_all(e):
                self._deliver_error(request_id, error)
            return
        for request_id, cause in self._core.take_failures():
            self._deliver_error(
                request_id,
                EngineError(f"the request failed the engine step on its own: {cause!r}"),
            )
        self._deliver(outputs)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        if outputs:
            items: list[tuple[str, _StreamItem]] = [(_request_id(o), o) for o in outputs]
            self._to_loop(items)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        self._to_loop([(request_id, error)])

    def _deliver_abort(self, request_id: str) -> None:
        out = self._core.abort(request_id)
        if out is not None:
            self._deliver([out])

    def _to_loop(self, items: list[tuple[str, _StreamItem]]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed event loop has nobody listening
            self._loop.call_soon_threadsafe(self._on_loop, items)


def _request_id(output: StepOutput) -> str:
    return output.first.request_id if isinstance(output, PrefillOutput) else output.request_id


if TYPE_CHECKING:  # AsyncEngine implements the Engine protocol (checked by mypy)
    from kvmesh.engine.protocol import Engine

    _engine_protocol_check: type[Engine] = AsyncEngine
