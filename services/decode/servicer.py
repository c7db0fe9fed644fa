"""`kvmesh.v1.Decode`: decode a request, its prompt KV read from a prefill worker or computed here.

With a KvHandle (checked first: `kvmesh.security.handles`), by the engine's transfer mode:

- MESH: reserve local blocks for what this worker's prefix cache lacks, READ those blocks from
  the prefill worker over NIXL (the READ's notification releases the prefill's lease);
- ENGINE: hand the handle (its `engine_state`, carried by the router) to the engine, which
  moves the KV itself; then release the prefill's lease by RPC;

then decode from the prefill's first token. Without one (the aggregated path, or a request
migrating from a failed decode worker), prefill prompt + tokens generated so far here. If the
prefill worker cannot be read (it died, its lease expired), fall back to computing locally:
slower, never wrong. A handle whose KV layout this worker cannot read (`kvmesh.kv.layout`) is
refused with FAILED_PRECONDITION before anything is fetched or reserved; the router then asks
again without it. KV in another block size or dtype than this worker's is READ as it is and
converted on import (`KvTransferAgent.read_converted`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import structlog

from kvmesh.api.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from kvmesh.errors import AuthorizationError, InvalidRequestError
from kvmesh.kv.errors import KvError, LayoutMismatchError
from kvmesh.kv.hashing import root_hash
from kvmesh.kv.layout import compatible
from kvmesh.rpc import RpcCallError, ServiceBinding
from kvmesh.sampling import SamplingParams
from kvmesh.telemetry import metrics, tracing
from kvmesh.types import GenerateRequest, TokenOutput, TransferMode
from kvmesh.worker import convert
from kvmesh.worker.leases import release_message
from kvmesh.worker.peers import PeerDirectory
from kvmesh.worker.runtime import WorkerRuntime

log = structlog.get_logger(__name__)


class DecodeServicer(worker_pb2_grpc.DecodeServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self._runtime = runtime
        self._peers: PeerDirectory | None = None
        self._background: set[asyncio.Task[None]] = set()
        metrics.zero(metrics.KV_HANDLES, "verified", "refused", "unverified", "read_raced_expiry")
        metrics.zero(metrics.KV_TRANSFER_BYTES, "received")

    @property
    def peers(self) -> PeerDirectory:
        if self._peers is None:
            self._peers = PeerDirectory(lambda: self._runtime.transfer)
        return self._peers

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: Any
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        if not request.request_id:
            raise InvalidRequestError("request_id is required")
        sampling = convert.sampling_from_proto(request.sampling)
        generated = list(request.generated_token_ids)
        if len(generated) >= sampling.max_tokens:
            raise InvalidRequestError("generated_token_ids already reach max_tokens")
        local_id = f"{request.request_id}#{uuid.uuid4().hex[:8]}"
        outputs: AsyncIterator[TokenOutput] | None = None
        transferred = 0
        if request.HasField("kv_handle") and generated and await self._trusted(request):
            self._check_layout(request.kv_handle)
            if self._runtime.transfer_mode is TransferMode.ENGINE:
                imported = await self._import_by_engine(local_id, request, sampling, generated[0])
            else:
                imported = await self._import(local_id, request, sampling, generated[0])
            if imported is not None:
                outputs, transferred = imported
        if outputs is None:  # aggregated, migrated, or the prefill worker could not be read
            prompt = (*request.prompt_token_ids, *generated)
            params = replace(sampling, max_tokens=sampling.max_tokens - len(generated))
            outputs = self._runtime.engine.generate(
                GenerateRequest(local_id, prompt, params, cache_salt=request.cache_salt)
            )
        first = True
        async for out in outputs:
            response = worker_pb2.DecodeResponse(
                token_ids=out.token_ids,
                logprobs=convert.logprobs_to_proto(out.logprobs),
                finish_reason=convert.finish_to_proto(out.finish_reason),
                stop_reason=convert.stop_reason_to_proto(out.stop_reason),
            )
            if first:
                response.num_cached_tokens = out.num_cached_tokens
                response.num_transferred_blocks = transferred
                first = False
            yield response

    async def _trusted(self, request: worker_pb2.DecodeRequest) -> bool:
        """Whether to use the request's KV handle: PERMISSION_DENIED (nothing read, nothing
        cached) for one forged, altered, expired or issued for another prompt; False for one
        whose prefill worker this worker cannot check (not in discovery): the prompt is then
        computed here (`kvmesh.security.handles`)."""
        handle, keys = request.kv_handle, self._runtime.handle_keys
        root = root_hash(self._runtime.engine.info.model_id, salt=request.cache_salt)
        try:
            if keys is not None and await keys.check(handle, request.prompt_token_ids, root):
                metrics.KV_HANDLES.labels("verified").inc()
                return True
        except AuthorizationError:
            metrics.KV_HANDLES.labels("refused").inc()
            raise
        metrics.KV_HANDLES.labels("unverified").inc()
        log.warning(
            "KV handle from a prefill worker not in discovery; computing locally",
            worker_id=handle.worker_id,
        )
        return False

    def _check_layout(self, handle: common_pb2.KvHandle) -> None:
        """Refuse KV this worker cannot read before anything is fetched or reserved."""
        ours = self._runtime.engine.info.layout_fingerprint
        difference = compatible(handle.layout_fingerprint, ours)
        if difference is not None:
            raise LayoutMismatchError(
                f"cannot import KV: prefill worker {handle.worker_id!r} wrote layout "
                f"{handle.layout_fingerprint}, decode worker {self._runtime.worker_id!r} reads "
                f"{ours}: {difference}"
            )

    async def _import(
        self,
        local_id: str,
        request: worker_pb2.DecodeRequest,
        sampling: SamplingParams,
        first_token: int,
    ) -> tuple[AsyncIterator[TokenOutput], int] | None:
        engine, handle = self._runtime.engine, request.kv_handle
        try:
            peer = await self.peers.peer(handle.worker_id, handle.grpc_address)
        except (RpcCallError, KvError) as e:
            log.warning("prefill worker unreachable; computing locally", error=str(e))
            return None
        engine_request = GenerateRequest(
            local_id, tuple(request.prompt_token_ids), sampling, cache_salt=request.cache_salt
        )
        transfer = self._runtime.transfer
        if transfer.peer_layout(peer) != handle.layout_fingerprint:
            raise LayoutMismatchError(
                f"cannot import KV: the handle says layout {handle.layout_fingerprint}, prefill "
                f"worker {handle.worker_id!r} serves {transfer.peer_layout(peer)}"
            )
        plan = await engine.reserve_import(engine_request, convert.handle_to_export(handle))
        converted = handle.layout_fingerprint != engine.info.layout_fingerprint
        # What this worker lacks: from its first uncached block, in the prefill's blocks.
        cached_tokens = plan.num_cached_blocks * plan.block_size
        remote_size = handle.block_size if converted else plan.block_size
        remote = list(handle.block_ids[cached_tokens // remote_size :])
        try:
            if remote and cached_tokens < plan.num_tokens:
                started = time.perf_counter()
                notify = release_message(handle.request_id, handle.release_token)
                with tracing.tracer().start_as_current_span("kv.transfer") as span:
                    span.set_attribute("kvmesh.kv.blocks", len(remote))
                    span.set_attribute("kvmesh.kv.prefill_worker", handle.worker_id)
                    span.set_attribute("kvmesh.kv.converted", converted)
                    if converted:
                        result = await transfer.read_converted(
                            peer,
                            remote,
                            plan.blocks_to_fill,
                            skip=cached_tokens % remote_size,
                            num_tokens=plan.num_tokens - cached_tokens,
                            notify=notify,
                        )
                    else:
                        result = await transfer.read_blocks(
                            peer, remote, plan.blocks_to_fill, notify=notify
                        )
                    seconds = time.perf_counter() - started
                    span.set_attribute("kvmesh.kv.bytes", result.num_bytes)
                    span.set_attribute("kvmesh.kv.seconds", seconds)
                metrics.KV_TRANSFER_BYTES.labels("received").inc(result.num_bytes)
                metrics.KV_TRANSFER_SECONDS.observe(seconds)
                if lease_may_have_ended(handle):
                    await self._discard_raced(local_id, handle)
                    return None
            else:  # everything was cached here: release the lease by RPC
                self._spawn(self.peers.release_lease(handle))
        except KvError as e:
            await engine.abort(local_id)
            self.peers.forget(handle.worker_id)
            log.warning("KV read failed; computing locally", error=str(e))
            return None
        except BaseException:
            await engine.abort(local_id)
            raise
        return engine.generate_imported(plan, first_token), len(remote)

    async def _import_by_engine(
        self,
        local_id: str,
        request: worker_pb2.DecodeRequest,
        sampling: SamplingParams,
        first_token: int,
    ) -> tuple[AsyncIterator[TokenOutput], int] | None:
        engine, handle = self._runtime.engine, request.kv_handle
        engine_request = GenerateRequest(
            local_id, tuple(request.prompt_token_ids), sampling, cache_salt=request.cache_salt
        )
        try:
            plan = await engine.reserve_import(engine_request, convert.handle_to_export(handle))
        except KvError as e:  # the engine could not fetch it (peer gone, expired)
            log.warning("engine KV transfer failed; computing locally", error=str(e))
            return None
        self._spawn(self.peers.release_lease(handle))
        if plan.num_cached_blocks < len(plan.block_ids) and lease_may_have_ended(handle):
            await self._discard_raced(local_id, handle)
            return None
        moved = len(plan.block_ids) - plan.num_cached_blocks
        return engine.generate_imported(plan, first_token), moved

    async def _discard_raced(self, local_id: str, handle: common_pb2.KvHandle) -> None:
        """The lease could have run out while the KV moved, and the prefill worker reused the
        blocks: use nothing moved (the import was never started: nothing is cached)."""
        await self._runtime.engine.abort(local_id)
        metrics.KV_HANDLES.labels("read_raced_expiry").inc()
        log.warning(
            "the lease could have expired during the KV read; computing locally",
            request_id=handle.request_id,
        )

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


LEASE_MARGIN_S = 1.0  # clock skew tolerated between the prefill and the decode worker


def lease_may_have_ended(handle: common_pb2.KvHandle, now: float | None = None) -> bool:
    """Whether the handle's lease could have run out by `now` (by the prefill worker's clock,
    with `LEASE_MARGIN_S` for skew): a READ that ends this late may hold reused blocks."""
    now = time.time() if now is None else now
    return now >= handle.lease_expiry.ToMicroseconds() / 1e6 - LEASE_MARGIN_S


def binding(runtime: WorkerRuntime) -> ServiceBinding:
    servicer = DecodeServicer(runtime)
    return ServiceBinding(
        worker_pb2.DESCRIPTOR.services_by_name["Decode"].full_name,
        lambda server: worker_pb2_grpc.add_DecodeServicer_to_server(servicer, server),
    )
