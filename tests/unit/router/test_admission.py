"""Admission: spill callers are refused at once; the others wait (waking the tier), never shed."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest

from kvmesh.discovery import DiscoveryError
from kvmesh.discovery.keys import wake_key
from kvmesh.rpc.errors import ResourceExhaustedError, UnavailableError
from kvmesh.rpc.spill import SPILL_KEY, wants_spill
from services.router.admission import Admission
from services.router.wake import WakeSignal


class FakePool:
    """`workers("decode")` and `wait_for("decode")`, with decode workers added by hand."""

    def __init__(self, num_decode: int = 0) -> None:
        self.decode: list[object] = [object() for _ in range(num_decode)]
        self._joined = asyncio.Event()

    def workers(self, tier: str) -> list[object]:
        return self.decode if tier == "decode" else []

    async def wait_for(self, tier: str, count: int = 1, timeout_s: float = 60.0) -> None:
        await asyncio.wait_for(self._joined.wait(), timeout_s)

    def add_decode(self) -> None:
        self.decode.append(object())
        self._joined.set()


class FakeKv:
    def __init__(self, *, failing: bool = False) -> None:
        self.writes: list[tuple[str, dict[str, Any]]] = []
        self.written = asyncio.Event()
        self._failing = failing

    async def kv_put(
        self, key: str, value: bytes | str, *, cas: int | None = None, datacenter: str | None = None
    ) -> bool:
        self.written.set()
        if self._failing:
            raise DiscoveryError("registry at nowhere unreachable")
        assert isinstance(value, str)
        self.writes.append((key, json.loads(value)))
        return True


def admission(pool: FakePool, kv: FakeKv | None = None, **kwargs: Any) -> Admission:
    fake: Any = pool
    return Admission(fake, wake_signal(kv or FakeKv()), **kwargs)


def wake_signal(kv: FakeKv) -> WakeSignal:
    wake = WakeSignal(kv, "m", "decode", refresh_s=0.01)
    wake.router = "127.0.0.1:5"
    return wake


def test_the_spill_key() -> None:
    assert wants_spill([(SPILL_KEY, "1"), ("x-request-id", "r")])
    assert not wants_spill([(SPILL_KEY, "0")])
    assert not wants_spill(None)


async def test_spill_without_decode_workers_is_unavailable_at_once() -> None:
    with pytest.raises(UnavailableError, match="no decode workers in this cluster"):
        async with admission(FakePool()).admitted(spill=True):
            raise AssertionError("admitted")


async def test_saturation_refuses_spill_callers_only() -> None:
    gate = admission(FakePool(num_decode=2), saturation_in_flight=2)
    async with contextlib.AsyncExitStack() as admitted:
        for _ in range(4):  # up to 2 per decode worker
            await admitted.enter_async_context(gate.admitted(spill=True))
        with pytest.raises(ResourceExhaustedError):
            async with gate.admitted(spill=True):
                raise AssertionError("admitted")
        async with gate.admitted(spill=False):  # nowhere else to go: never shed
            assert gate.in_flight == 5
    assert gate.in_flight == 0


async def test_the_refusal_gives_the_numbers() -> None:
    gate = admission(FakePool(num_decode=2), saturation_in_flight=1)
    async with gate.admitted(spill=True), gate.admitted(spill=True):
        with pytest.raises(ResourceExhaustedError) as refused:
            async with gate.admitted(spill=True):
                pass
    assert str(refused.value) == (
        "router saturated: 2 requests in flight on 2 decode workers "
        "(1.0 per worker, limit 1 per worker)"
    )


async def test_zero_saturation_never_sheds() -> None:
    gate = admission(FakePool(num_decode=1))
    async with gate.admitted(spill=True), gate.admitted(spill=True):
        assert gate.in_flight == 2


async def test_without_spill_a_request_waits_for_a_worker_and_writes_the_wake_key() -> None:
    pool, kv = FakePool(), FakeKv()
    wake = wake_signal(kv)
    fake: Any = pool
    gate = Admission(fake, wake)

    async def request() -> int:
        async with gate.admitted(spill=False):
            return gate.in_flight

    waiting = asyncio.create_task(request())
    await asyncio.wait_for(kv.written.wait(), 5)
    key, value = kv.writes[0]
    assert key == wake_key("m", "decode") == "kvmesh/autoscaler/wake/m/decode"
    assert value["router"] == "127.0.0.1:5" and value["time"] > 0
    assert not waiting.done() and wake.is_raised
    pool.add_decode()
    assert await asyncio.wait_for(waiting, 5) == 1
    assert not wake.is_raised  # no request waits: the key is no longer refreshed


async def test_the_wait_ends_unavailable_and_registry_failures_do_not_fail_it() -> None:
    kv = FakeKv(failing=True)
    gate = admission(FakePool(), kv, wake_timeout_s=0.05)
    with pytest.raises(UnavailableError, match=r"none appeared within 0\.05 s"):
        async with gate.admitted(spill=False):
            pass
    assert kv.written.is_set()


async def test_past_max_in_flight_requests_queue_and_past_the_queue_they_are_refused() -> None:
    gate = admission(FakePool(num_decode=1), max_in_flight=2, max_queue=1)
    release = asyncio.Event()
    order: list[str] = []

    async def request(name: str) -> None:
        async with gate.admitted(spill=False):
            order.append(name)
            await release.wait()

    running = [asyncio.create_task(request(n)) for n in ("a", "b")]
    await asyncio.sleep(0)  # a yield to the event loop, no time passes: both are admitted
    waiting = asyncio.create_task(request("c"))
    await asyncio.sleep(0)  # a yield: c reaches the queue
    assert (gate.in_flight, gate.queued, order) == (2, 1, ["a", "b"])
    with pytest.raises(ResourceExhaustedError, match="router queue full: 2 requests running"):
        async with gate.admitted(spill=False):
            pass
    release.set()
    await asyncio.gather(*running, waiting)
    assert order == ["a", "b", "c"] and (gate.in_flight, gate.queued) == (0, 0)


async def test_a_caller_that_leaves_the_queue_frees_its_place() -> None:
    gate = admission(FakePool(num_decode=1), max_in_flight=1, max_queue=1)
    hold = asyncio.Event()

    async def request() -> None:
        async with gate.admitted(spill=False):
            await hold.wait()

    first = asyncio.create_task(request())
    await asyncio.sleep(0)  # a yield: first takes the slot
    second = asyncio.create_task(request())
    await asyncio.sleep(0)  # a yield: second reaches the queue
    assert gate.queued == 1
    second.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await second
    assert gate.queued == 0
    hold.set()
    await first
    async with gate.admitted(spill=False):  # the slot came back
        assert gate.in_flight == 1
