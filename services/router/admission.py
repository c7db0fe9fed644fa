"""Whether a Generate request runs now, waits for a decode worker, or is refused at once.

    no decode worker   spill (x-kvmesh-spill: 1): UNAVAILABLE at once, the caller tries elsewhere
                       otherwise: wait for one up to `wake_timeout_s` (the wake key says so),
                       then UNAVAILABLE
    saturated          spill: RESOURCE_EXHAUSTED at once, with the numbers
                       otherwise: admitted (this router never sheds a caller with nowhere to go)

Saturated: this router's admitted requests per ready decode worker reach `saturation_in_flight`
(0: never). Admitted requests are counted from admission to their last message, prefill and
migrations included, so the count moves at once, unlike load reports.

Bounded, whatever the caller: at most `max_in_flight` admitted requests run at once; the next
wait, in arrival order, in a queue of at most `max_queue`; past that a request is refused at
once with RESOURCE_EXHAUSTED (the edge answers 429), so a burst never grows memory or latency
without bound and never hangs a caller.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog

from kvmesh.rpc.errors import ResourceExhaustedError, UnavailableError
from kvmesh.telemetry import metrics
from services.router.pool import WorkerPool
from services.router.wake import WakeSignal

log = structlog.get_logger(__name__)

NO_DECODE_WORKERS = "no decode workers in this cluster"


class Admission:
    def __init__(
        self,
        pool: WorkerPool,
        wake: WakeSignal | None,
        *,
        saturation_in_flight: int = 0,
        wake_timeout_s: float = 120.0,
        max_in_flight: int = 0,
        max_queue: int = 0,
    ) -> None:
        self._pool = pool
        self._wake = wake
        self._saturation = saturation_in_flight
        self._wake_timeout_s = wake_timeout_s
        self._max_in_flight = max_in_flight
        self._max_queue = max_queue
        self._slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        self.in_flight = 0
        self.queued = 0
        metrics.zero(metrics.ROUTER_SHED, "queue_full", "no_decode_workers", "saturated")

    @contextlib.asynccontextmanager
    async def admitted(self, *, spill: bool) -> AsyncIterator[None]:
        """Inside: the request is admitted and counted. Raises if it is refused or times out."""
        await self._refuse_or_wait(spill)
        await self._take_slot()
        self.in_flight += 1
        metrics.ROUTER_REQUESTS_IN_FLIGHT.set(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            metrics.ROUTER_REQUESTS_IN_FLIGHT.set(self.in_flight)
            if self._slots is not None:
                self._slots.release()

    async def _take_slot(self) -> None:
        if self._slots is None:
            return
        if self._slots.locked() and self.queued >= self._max_queue:
            metrics.ROUTER_SHED.labels("queue_full").inc()
            raise ResourceExhaustedError(
                f"router queue full: {self.in_flight} requests running (limit "
                f"{self._max_in_flight}) and {self.queued} waiting (limit {self._max_queue})"
            )
        self.queued += 1
        metrics.ROUTER_REQUESTS_QUEUED.set(self.queued)
        try:
            await self._slots.acquire()
        finally:
            self.queued -= 1
            metrics.ROUTER_REQUESTS_QUEUED.set(self.queued)

    async def _refuse_or_wait(self, spill: bool) -> None:
        if not self._pool.workers("decode"):
            if spill:
                metrics.ROUTER_SHED.labels("no_decode_workers").inc()
                raise UnavailableError(NO_DECODE_WORKERS)
            await self._wait_for_decode()
        if spill and self._saturation > 0:
            num_workers = len(self._pool.workers("decode"))
            per_worker = self.in_flight / max(num_workers, 1)
            if per_worker >= self._saturation:
                metrics.ROUTER_SHED.labels("saturated").inc()
                raise ResourceExhaustedError(
                    f"router saturated: {self.in_flight} requests in flight on {num_workers} "
                    f"decode workers ({per_worker:.1f} per worker, limit "
                    f"{self._saturation} per worker)"
                )

    async def _wait_for_decode(self) -> None:
        log.info("no decode worker; the request waits for one", timeout_s=self._wake_timeout_s)
        metrics.ROUTER_REQUESTS_WAITING.inc()
        try:
            async with self._wake.raised() if self._wake else contextlib.nullcontext():
                await self._pool.wait_for("decode", timeout_s=self._wake_timeout_s)
        except TimeoutError:
            raise UnavailableError(
                f"{NO_DECODE_WORKERS}: none appeared within {self._wake_timeout_s:g} s"
            ) from None
        finally:
            metrics.ROUTER_REQUESTS_WAITING.dec()
