"""`kvmesh.v1.Prefill`: prefill a prompt, pin its KV under a lease, return the first token."""

from __future__ import annotations

import uuid
from typing import Any

import structlog

from kvmesh.api.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from kvmesh.errors import InvalidRequestError
from kvmesh.kv.hashing import root_hash
from kvmesh.rpc import ServiceBinding
from kvmesh.types import GenerateRequest
from kvmesh.worker import convert
from kvmesh.worker.leases import new_release_token
from kvmesh.worker.runtime import WorkerRuntime

log = structlog.get_logger(__name__)

MAX_LEASE_S = 600.0


class PrefillServicer(worker_pb2_grpc.PrefillServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self._runtime = runtime

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: Any
    ) -> worker_pb2.PrefillResponse:
        runtime = self._runtime
        if not request.request_id:
            raise InvalidRequestError("request_id is required")
        lease_s = (
            request.lease_ms / 1000 if request.HasField("lease_ms") else runtime.config.lease_s
        )
        if not 0 < lease_s <= MAX_LEASE_S:
            raise InvalidRequestError(f"lease_ms must be in (0, {int(MAX_LEASE_S * 1000)}]")
        # The engine's id is this call's own: a request retried here under the same id (its
        # router died and the edge sent it again) must not meet the export and lease of the
        # first try, which wait to be read or to expire. The handle names this id.
        engine_request = GenerateRequest(
            f"{request.request_id}#{uuid.uuid4().hex[:8]}",
            tuple(request.prompt_token_ids),
            convert.sampling_from_proto(request.sampling),
            cache_salt=request.cache_salt,
        )
        result = await runtime.engine.prefill(engine_request)
        first = result.first
        response = worker_pb2.PrefillResponse(
            first_token_id=first.token_ids[0],
            finish_reason=convert.finish_to_proto(first.finish_reason),
            stop_reason=convert.stop_reason_to_proto(first.stop_reason),
            num_cached_tokens=first.num_cached_tokens,
        )
        if first.logprobs:
            response.first_logprob.CopyFrom(convert.logprobs_to_proto(first.logprobs)[0])
        export = result.export
        if export is not None:
            token = new_release_token()
            runtime.leases.grant(export.request_id, lease_s, token)
            response.kv_handle.CopyFrom(
                common_pb2.KvHandle(
                    request_id=export.request_id,
                    worker_id=runtime.worker_id,
                    grpc_address=runtime.server.address if runtime.server else "",
                    nixl_agent=runtime.worker_id,
                    block_ids=list(export.block_ids),
                    num_tokens=export.num_tokens,
                    block_size=export.block_size,
                    layout_fingerprint=export.layout_fingerprint,
                    lease_expiry=convert.timestamp(lease_s),
                    engine_state=export.opaque,
                    release_token=token,
                )
            )
            runtime.handle_signer.bind(
                response.kv_handle,
                engine_request.prompt_token_ids,
                export.block_size,
                root_hash(runtime.engine.info.model_id, salt=request.cache_salt),
            )
        return response


def binding(runtime: WorkerRuntime) -> ServiceBinding:
    servicer = PrefillServicer(runtime)
    return ServiceBinding(
        worker_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name,
        lambda server: worker_pb2_grpc.add_PrefillServicer_to_server(servicer, server),
    )
