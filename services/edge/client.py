"""The edge's view of the router: `Generation` calls and its health, failures as `RouterError`.

Calls do not wait for a router that is down (`wait_for_ready=False`): an HTTP client is better
served by a quick 503 it can retry (the OpenAI clients do) than by a request parked until its
deadline. Streams are never retried on the same router (the router owns retries); moving a
request to another cluster's router is `clusters.py`'s job.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.api.v1 import generation_pb2, generation_pb2_grpc
from kvmesh.rpc import REQUEST_ID_KEY
from kvmesh.rpc.spill import SPILL_KEY, SPILL_YES
from services.edge import errors

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


class GenerationStream:
    """One `Generate` call. `cancel()` ends it on the router too; safe once it has ended."""

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall[
            generation_pb2.GenerateRequest, generation_pb2.GenerateResponse
        ],
        request_id: str,
    ) -> None:
        self._call = call
        self.request_id = request_id

    async def next(self) -> generation_pb2.GenerateResponse | None:
        """The next message; None once the router has sent the last one."""
        try:
            message = await self._call.read()
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e, request_id=self.request_id) from e
        # read() returns grpc.aio.EOF after the last message
        return message if isinstance(message, generation_pb2.GenerateResponse) else None

    def cancel(self) -> None:
        self._call.cancel()


class GenerationClient:
    """`kvmesh.v1.Generation` and the router's health, on a channel the caller owns."""

    def __init__(
        self, channel: grpc.aio.Channel, *, request_timeout_s: float, probe_timeout_s: float
    ) -> None:
        self._generation = generation_pb2_grpc.GenerationStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._request_timeout_s = request_timeout_s
        self._probe_timeout_s = probe_timeout_s

    def generate(
        self,
        request: generation_pb2.GenerateRequest,
        *,
        spill: bool = False,
        timeout_s: float | None = None,
    ) -> GenerationStream:
        """Start `Generate`. `spill`: the router may refuse at once rather than wait or queue
        (the caller has another cluster to try). `timeout_s`: the deadline, if not the whole
        `request_timeout_s` (what is left of it after an earlier attempt)."""
        metadata: tuple[tuple[str, str], ...] = ((REQUEST_ID_KEY, request.request_id),)
        if spill:
            metadata += ((SPILL_KEY, SPILL_YES),)
        call = self._generation.Generate(
            request,
            timeout=self._request_timeout_s if timeout_s is None else timeout_s,
            metadata=metadata,
            wait_for_ready=False,
        )
        return GenerationStream(call, request.request_id)

    async def list_models(self, *, request_id: str) -> list[generation_pb2.ModelInfo]:
        try:
            response = await self._generation.ListModels(
                generation_pb2.ListModelsRequest(),
                timeout=self._probe_timeout_s,
                metadata=((REQUEST_ID_KEY, request_id),),
                wait_for_ready=False,
            )
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e, request_id=request_id) from e
        return list(response.models)

    async def is_serving(self) -> tuple[bool, str]:
        """The router's `grpc.health.v1` status for Generation: (serving, why not)."""
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=GENERATION_SERVICE),
                timeout=self._probe_timeout_s,
                wait_for_ready=False,
            )
        except grpc.RpcError as e:
            return False, f"the router's health check failed: {e.code().name}"
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            return False, f"the router is {name}"
        return True, ""
