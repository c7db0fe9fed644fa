"""The checks the registry runs itself: TTL expiry, reaping, and gRPC health probes.

One `CheckRunner` per datacenter. Its loop sleeps until the earliest TTL deadline or reap time
(or until the datacenter changes), then lets the catalog expire what is due — so a dead
instance goes critical right when its TTL passes, not at the next tick of a coarse reaper.

A gRPC check gets its own task that calls grpc.health.v1.Health/Check on the target every
interval, as a Consul agent does: SERVING -> passing, anything else or an error -> critical.
A check whose definition changes (re-registered) is a new `Check` object, and its probe is
restarted; a probe's late answer for a replaced check is ignored by the catalog.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.discovery.registry.index import wait_event
from kvmesh.discovery.registry.records import CRITICAL, PASSING, Check, CheckStatus
from kvmesh.discovery.registry.state import Datacenter
from kvmesh.security import tls
from kvmesh.security.certs import TARGET_NAME

log = structlog.get_logger(__name__)

DEFAULT_GRPC_TIMEOUT_S = 10.0  # Consul's default check timeout


@dataclass(frozen=True, slots=True)
class GrpcTarget:
    """A check's GRPC field: "host:port" or "host:port/service"."""

    address: str
    service: str

    @classmethod
    def parse(cls, target: str) -> GrpcTarget:
        address, _, service = target.partition("/")
        return cls(address, service)


class CheckRunner:
    def __init__(self, datacenter: Datacenter) -> None:
        self._dc = datacenter
        self._loop_task: asyncio.Task[None] | None = None
        self._probes: dict[str, tuple[Check, asyncio.Task[None]]] = {}

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name=f"checks-{self._dc.name}")

    async def stop(self) -> None:
        tasks = [task for _, task in self._probes.values()]
        if self._loop_task is not None:
            tasks.append(self._loop_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._probes.clear()
        self._loop_task = None

    async def _run(self) -> None:
        catalog = self._dc.catalog
        while True:
            changed = self._dc.index.changed
            next_due = catalog.expire(time.monotonic())
            self._reconcile_probes()
            timeout = None if next_due is None else max(0.0, next_due - time.monotonic())
            await wait_event(changed, timeout)

    def _reconcile_probes(self) -> None:
        wanted = {c.check_id: c for c in self._dc.catalog.grpc_checks()}
        for check_id, (check, task) in list(self._probes.items()):
            if wanted.get(check_id) is not check:
                task.cancel()
                del self._probes[check_id]
        for check_id, check in wanted.items():
            if check_id not in self._probes:
                task = asyncio.create_task(self._probe(check), name=f"grpc-check-{check_id}")
                self._probes[check_id] = (check, task)

    async def _probe(self, check: Check) -> None:
        definition = check.definition
        assert definition is not None and definition.grpc, "only gRPC checks are probed"
        target = GrpcTarget.parse(definition.grpc)
        timeout_s = definition.timeout_ns / 1e9 or DEFAULT_GRPC_TIMEOUT_S
        channel = _channel(target.address, definition.grpc_use_tls, definition.tls_server_name)
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            while True:
                try:
                    status, output = await _check_once(stub, target, timeout_s)
                except Exception as e:  # a probe must not die: the check would freeze as it is
                    log.exception("gRPC check failed unexpectedly", check_id=check.check_id)
                    status, output = CRITICAL, f"gRPC check {target.address}: {e!r}"
                self._dc.catalog.record_probe(check, status, output, time.monotonic())
                await asyncio.sleep(definition.interval_ns / 1e9)
        finally:
            await channel.close(None)


async def _check_once(
    stub: health_pb2_grpc.HealthStub, target: GrpcTarget, timeout_s: float
) -> tuple[CheckStatus, str]:
    request = health_pb2.HealthCheckRequest(service=target.service)
    try:
        response = await stub.Check(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        code = "".join(part.capitalize() for part in e.code().name.split("_"))
        return CRITICAL, f"rpc error: code = {code} desc = {e.details()}"
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return CRITICAL, f"gRPC {target.address} serving status: {name}"
    return PASSING, f"gRPC check {target.address}: success"


def _channel(address: str, use_tls: bool, server_name: str) -> grpc.aio.Channel:
    if not use_tls:
        return grpc.aio.insecure_channel(address)
    identity = tls.current()
    if identity is not None:  # mutual TLS: the registry presents its own certificate
        options = [("grpc.ssl_target_name_override", server_name or TARGET_NAME)]
        return grpc.aio.secure_channel(address, identity.channel_credentials(), options=options)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(), options=options)
