"""Keeps one service instance registered while its process serves.

`start()` registers it and, for a TTL check, passes the check every third of the TTL (a
process that dies stops passing it, goes critical within the TTL, and is removed from the
catalog after `deregister_critical_after_s`). `stop()` deregisters at once: watchers see the
instance leave before its in-flight requests finish.

A registry that restarts without its data forgets the instance: a TTL heartbeat that fails
registers it again, and an instance with a gRPC check (no heartbeat) asks every
`PRESENCE_CHECK_S` whether the registry still knows it, and registers again if not. While the
registry is down, both keep trying; the service serves on meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from kvmesh.discovery.client import Discovery, DiscoveryError, Registration

log = structlog.get_logger(__name__)

PRESENCE_CHECK_S = 5.0


class Registrar:
    def __init__(self, discovery: Discovery, registration: Registration) -> None:
        self.discovery = discovery
        self.registration = registration
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.discovery.register(self.registration)
        if self.registration.ttl_s is not None and self.registration.grpc_check_interval_s is None:
            await self.discovery.pass_ttl(self.registration.check_id)
            self._heartbeat = asyncio.create_task(self._beat(self.registration.ttl_s / 3))
        else:
            self._heartbeat = asyncio.create_task(self._stay_registered(PRESENCE_CHECK_S))
        log.info(
            "registered",
            service=self.registration.name,
            service_id=self.registration.service_id,
            registry=self.discovery.address,
        )

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        try:
            await self.discovery.deregister(self.registration.service_id)
        except DiscoveryError as e:  # the TTL will remove it anyway
            log.warning("deregistration failed", error=str(e))

    async def _stay_registered(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                if not await self.discovery.is_registered(self.registration.service_id):
                    log.warning("the registry forgot this instance; registering again")
                    await self.discovery.register(self.registration)
            except DiscoveryError as e:
                log.debug("registry unreachable; will check again", error=str(e))

    async def _beat(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.discovery.pass_ttl(self.registration.check_id)
            except DiscoveryError as e:
                # The agent may have restarted and forgotten us: register again.
                log.warning("heartbeat failed; registering again", error=str(e))
                with contextlib.suppress(DiscoveryError):
                    await self.discovery.register(self.registration)
