"""Pairing by KV layout: the router sends a prefill worker's KV only to a decode worker that can
read it, serves the rest aggregated, and retries a refused handle without it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from kvmesh.api.v1 import common_pb2, worker_pb2
from kvmesh.kv.hashing import hash_blocks, root_hash
from kvmesh.sampling import SamplingParams
from services.router.args import RouterConfig
from services.router.planning import NO_COMPATIBLE_PREFILL, Plan, Planner
from services.router.policy import PolicyConfig, Router
from services.router.pool import Worker, WorkerPool
from services.router.servicer import GenerationServicer
from services.router.stream import RequestStream

MODEL = "m"
PROMPT = list(range(100, 100 + 8 * 16))


def fingerprint(block_size: int = 16, dtype: str = "f32", layers: int = 30) -> str:
    return f"kvmesh-kv/v1:LT2HD:L{layers}:H3:D64:B{block_size}:{dtype}"


def join(
    pool: WorkerPool, worker: Worker, block_size: int = 16, dtype: str = "f32", layers: int = 30
) -> Worker:
    """As the pool's load watcher does when a worker's GetInfo answers."""
    worker.info = worker_pb2.WorkerInfo(
        worker_id=worker.worker_id,
        model=MODEL,
        block_size=block_size,
        layout_fingerprint=fingerprint(block_size, dtype, layers),
    )
    pool._workers[worker.tier][worker.worker_id] = worker
    pool._check_pairs(worker)
    return worker


def worker(worker_id: str, tier: str, **meta: str) -> Worker:
    channel: Any = None  # never called here
    return Worker(worker_id, tier, "127.0.0.1:9", channel, meta=dict(meta))


def new_pool() -> WorkerPool:
    discovery: Any = None  # workers join by hand
    return WorkerPool(discovery)


def planner(pool: WorkerPool, disagg_min_tokens: int = 0) -> Planner:
    router = Router(PolicyConfig(), pool.index)
    return Planner(pool, router, disagg_min_tokens=disagg_min_tokens)


def decisions(reason: str) -> float:
    labels = {"tier": "prefill", "policy": "cache_aware", "reason": reason}
    return REGISTRY.get_sample_value("kvmesh_router_decisions_total", labels) or 0.0


def test_only_compatible_workers_pair_and_each_bad_pair_is_logged_once() -> None:
    pool = new_pool()
    p16 = join(pool, worker("p16", "prefill"))
    with capture_logs() as logs:
        d16 = join(pool, worker("d16", "decode"))
        d32 = join(pool, worker("d32", "decode"), block_size=32, layers=24)
        join(pool, d32, block_size=32, layers=24)  # its info again (a reconnect): no warning
    assert pool.incompatibility(p16, d16) is None
    assert pool.incompatibility(p16, d32) == "layers 30 vs 24"
    assert pool.incompatibility(d32, p16) == "layers 30 vs 24"  # either order
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["prefill_worker"] == "p16" and warnings[0]["decode_worker"] == "d32"
    assert warnings[0]["difference"] == "layers 30 vs 24"
    assert pool.candidates("prefill", paired_with=d16) == [p16]
    assert pool.candidates("prefill", paired_with=d32) == []
    assert pool.candidates("prefill") == [p16]  # unpaired, every ready worker


def test_the_transfer_mode_from_discovery_counts() -> None:
    pool = new_pool()
    p = join(pool, worker("p", "prefill", transfer_mode="mesh"))
    d = join(pool, worker("d", "decode", transfer_mode="engine"))
    assert pool.incompatibility(p, d) == "transfer mode mesh vs engine"


async def test_a_worker_that_leaves_takes_its_pairs_along() -> None:
    pool = new_pool()
    p = join(pool, worker("p", "prefill"))
    d = join(pool, worker("d", "decode"), layers=24)
    assert pool.incompatibility(p, d) == "layers 30 vs 24"
    channel: Any = _ClosableChannel()
    d.channel = channel
    await pool._remove(pool._workers["decode"].pop("d"))
    assert pool._incompatible == {}


def test_the_planner_picks_a_prefill_worker_the_decode_worker_can_read() -> None:
    pool = new_pool()
    for w in ("p16", "p32", "d32"):
        pool.index.reset(w, [], last_event_id=0)
    join(pool, worker("p16", "prefill"), layers=24)
    join(pool, worker("p32", "prefill"), block_size=32)
    join(pool, worker("d32", "decode"), block_size=32)
    # p16 holds the whole prompt and idles; p32 is busy: only p32 can feed d32 all the same.
    pool.index.stored("p16", 1, hash_blocks(PROMPT, 16, root_hash(MODEL)))
    pool._workers["prefill"]["p32"].pending_tokens = 10_000
    plan = planner(pool).plan(PROMPT)
    assert plan.prefill is not None and plan.prefill.chosen is not None
    assert plan.prefill.chosen.worker.worker_id == "p32"
    assert [c.worker.worker_id for c in plan.prefill.candidates] == ["p32"]
    assert plan.decode_hashes.block_size == 32
    assert plan.hashes == hash_blocks(PROMPT, 32, root_hash(MODEL))
    retry = planner(pool).again(plan, "prefill", exclude=["p32"])
    assert retry.chosen is None  # p16 is no fallback for a prefill retry either


def test_no_compatible_prefill_worker_means_aggregated_with_a_reason() -> None:
    pool = new_pool()
    join(pool, worker("p", "prefill"))
    join(pool, worker("d", "decode"), block_size=32, layers=24)
    before = decisions(NO_COMPATIBLE_PREFILL)
    plan = planner(pool).plan(PROMPT)
    assert plan.prefill is None
    assert plan.decode.chosen is not None and plan.decode.chosen.worker.worker_id == "d"
    assert decisions(NO_COMPATIBLE_PREFILL) == before + 1
    planner(pool).plan(PROMPT, record=False)  # ExplainRoute records nothing
    assert decisions(NO_COMPATIBLE_PREFILL) == before + 1


def test_a_short_prompt_stays_aggregated_without_that_reason() -> None:
    pool = new_pool()
    join(pool, worker("p", "prefill"))
    join(pool, worker("d", "decode"), block_size=32, layers=24)
    before = decisions(NO_COMPATIBLE_PREFILL)
    assert planner(pool, disagg_min_tokens=10_000).plan(PROMPT).prefill is None
    assert decisions(NO_COMPATIBLE_PREFILL) == before


def test_an_ejected_compatible_worker_beats_an_incompatible_healthy_one() -> None:
    pool = new_pool()
    good = join(pool, worker("good", "prefill"))
    join(pool, worker("other", "prefill"), layers=24)
    d = join(pool, worker("d", "decode"))
    for _ in range(pool.outliers.config.consecutive_failures):
        pool.outliers.record("good", "prefill", ok=False)
    assert pool.outliers.is_ejected("good")
    assert pool.candidates("prefill", paired_with=d) == [good]


# -- the router's retry when a decode worker refuses the handle ------------------------------------


class _ClosableChannel:
    async def close(self, grace: float | None) -> None:
        return None


class _Call:
    """A Decode call: refuses a handle, else streams one finished message."""

    def __init__(self, request: worker_pb2.DecodeRequest) -> None:
        self._request = request
        self._done = False

    def __aiter__(self) -> _Call:
        return self

    async def __anext__(self) -> worker_pb2.DecodeResponse:
        if self._request.HasField("kv_handle"):
            empty = grpc.aio.Metadata()
            details = "cannot import KV: layers 30 vs 24"
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.FAILED_PRECONDITION, empty, empty, details, debug_error_string=""
            )
        if self._done:
            raise StopAsyncIteration
        self._done = True
        return worker_pb2.DecodeResponse(
            token_ids=[7, 8], finish_reason=common_pb2.FINISH_REASON_LENGTH
        )

    def cancel(self) -> bool:
        return True


class _DecodeStub:
    def __init__(self) -> None:
        self.requests: list[worker_pb2.DecodeRequest] = []

    def Decode(self, request: worker_pb2.DecodeRequest) -> _Call:
        self.requests.append(request)
        return _Call(request)


class _DecodeWorker(Worker):
    """A decode worker whose Decode calls go to a `_DecodeStub`."""

    stub: _DecodeStub

    @property
    def decode(self) -> Any:
        return self.stub


async def test_a_refused_handle_is_released_and_decode_runs_there_without_it() -> None:
    pool = new_pool()
    channel: Any = _ClosableChannel()
    d = _DecodeWorker("d", "decode", "127.0.0.1:9", channel)
    d.stub = _DecodeStub()
    join(pool, d)
    plan: Plan = planner(pool).plan(PROMPT)
    unused: Any = None
    servicer = GenerationServicer(RouterConfig(), pool, None, MODEL, planner(pool))
    released: list[str] = []

    async def release(handle: common_pb2.KvHandle) -> None:
        released.append(handle.request_id)

    servicer._release = release  # type: ignore[method-assign]
    stream = RequestStream("r", PROMPT, SamplingParams(max_tokens=3), unused, return_token_ids=True)
    stream.add([5], [], common_pb2.FINISH_REASON_UNSPECIFIED, "")  # the prefill's first token
    handle = common_pb2.KvHandle(request_id="r", worker_id="p")
    out: AsyncIterator[Any] = servicer._decode(stream, handle, plan)
    responses = [r async for r in out]
    assert stream.generated == [5, 7, 8] and stream.finished
    assert len(responses) == 1
    first, second = d.stub.requests
    assert first.HasField("kv_handle") and not second.HasField("kv_handle")
    assert list(second.generated_token_ids) == [5]
    for task in list(servicer._background):
        await task
    assert released == ["r"]
    assert stream.migrations == 0 and not pool.outliers.is_ejected(d.worker_id)


# -- the client's RPC ends while the handler waits at a yield -------------------------------------


class _EndlessCall:
    """A Decode call that streams a token a message until it is cancelled."""

    def __init__(self) -> None:
        self.cancelled = False

    def __aiter__(self) -> _EndlessCall:
        return self

    async def __anext__(self) -> worker_pb2.DecodeResponse:
        if self.cancelled:
            raise StopAsyncIteration
        return worker_pb2.DecodeResponse(token_ids=[9])

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_ending_the_rpc_cancels_the_decode_call_of_a_handler_paused_at_a_yield() -> None:
    """gRPC cancels a streaming handler's task, but a generator paused at `yield` never sees
    it: the call must be cancelled from the RPC's done callback (`RequestStream.cancel_calls`)."""
    pool = new_pool()
    channel: Any = _ClosableChannel()
    d = _DecodeWorker("d", "decode", "127.0.0.1:9", channel)
    call = _EndlessCall()
    stub: Any = _DecodeStub()
    stub.Decode = lambda request: call
    d.stub = stub
    join(pool, d)
    servicer = GenerationServicer(RouterConfig(), pool, None, MODEL, planner(pool))
    unused: Any = None
    stream = RequestStream(
        "c", PROMPT, SamplingParams(max_tokens=100), unused, return_token_ids=True
    )
    responses = servicer._decode(stream, None, planner(pool).plan(PROMPT))
    await anext(responses)  # the handler now waits at its yield, the call open
    assert stream.calls == {call} and not call.cancelled
    stream.cancel_calls()  # what Generate's done callback does
    assert call.cancelled
    await responses.aclose()
    assert stream.calls == set()


def test_each_tier_is_scored_by_hashes_as_its_workers_compute_them() -> None:
    """A B64 bf16 prefill worker and a B16 fp8 decode worker pair (decode converts); each is
    scored against its own hashes: block size and KV dtype folded in."""
    pool = new_pool()
    for w in ("p64", "d16"):
        pool.index.reset(w, [], last_event_id=0)
    join(pool, worker("p64", "prefill", kv_dtype="bfloat16"), block_size=64, dtype="bf16")
    join(pool, worker("d16", "decode", kv_dtype="fp8_e4m3"), dtype="e4m3")
    prefill_hashes = hash_blocks(PROMPT, 64, root_hash(MODEL, kv_dtype="bfloat16"))
    pool.index.stored("p64", 1, prefill_hashes)
    plan = planner(pool).plan(PROMPT)
    assert plan.hashes == hash_blocks(PROMPT, 16, root_hash(MODEL, kv_dtype="fp8_e4m3"))
    assert plan.prefill_hashes is not None
    assert plan.prefill_hashes.hashes == prefill_hashes
    assert plan.prefill is not None and plan.prefill.chosen is not None
    assert plan.prefill.chosen.cached_blocks == len(prefill_hashes)  # its cache counted
