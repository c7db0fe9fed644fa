"""`EmbeddedRegistry`: the registry's datacenters, one HTTP agent per datacenter, their checkers.

    async with EmbeddedRegistry(["dc1", "dc2"], port=0) as registry:
        consul.aio.Consul(host=..., port=...) # at registry.address("dc2")

With a TLS identity every agent serves HTTPS (`registry.url(dc)` says `https://`).

`run_registry` serves until cancelled or sent SIGINT/SIGTERM (the `kvmesh registry` command).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import structlog
from aiohttp import web

from kvmesh.discovery.registry.acl import AclConfig
from kvmesh.discovery.registry.checks import CheckRunner
from kvmesh.discovery.registry.errors import ListenError
from kvmesh.discovery.registry.http import build_app
from kvmesh.discovery.registry.journal import Journal
from kvmesh.discovery.registry.state import RegistryState, validate_datacenter_names
from kvmesh.security import certs
from kvmesh.security.tls import TlsIdentity

log = structlog.get_logger(__name__)

DEFAULT_PORT = 8500  # Consul's HTTP port
_SHUTDOWN_GRACE_S = 2.0  # blocking queries are released first, so requests end quickly


class EmbeddedRegistry:
    """An in-process server of the subset of Consul's HTTP API that kvmesh uses.

    Each datacenter gets its own agent: an HTTP listener whose /v1/agent endpoints act on that
    datacenter. The first listens on `port`; the others on `port + i`, or on free ports when
    `port` is 0. Catalog, health and KV endpoints of any agent reach every datacenter through
    `?dc=`.
    """

    def __init__(
        self,
        datacenters: Sequence[str] = ("dc1",),
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        acl: AclConfig | None = None,
        tls: TlsIdentity | None = None,
        verify_incoming: bool = False,
        data_dir: Path | None = None,
    ) -> None:
        """`tls`: serve HTTPS with this identity's certificate; `verify_incoming`: and require
        a client certificate from its CA (Consul's `verify_incoming`); `data_dir`: keep the
        durable state there (`journal.py`), restored at start."""
        self._data_dir = data_dir
        self._names = list(datacenters)
        self._acl = acl
        if verify_incoming and tls is None:
            raise ValueError("verify_incoming needs a TLS identity")
        self._ssl = _server_ssl(tls, verify_incoming) if tls is not None else None
        validate_datacenter_names(self._names)
        if not 0 <= port <= 65535:
            raise ValueError(f"invalid port {port}")
        self._host = host
        self._port = port
        self._state: RegistryState | None = None
        self._runners: list[web.AppRunner] = []
        self._checkers: list[CheckRunner] = []
        self._ports: dict[str, int] = {}

    @property
    def datacenters(self) -> list[str]:
        return list(self._names)

    @property
    def scheme(self) -> str:
        return "https" if self._ssl is not None else "http"

    def url(self, datacenter: str | None = None) -> str:
        """ "scheme://host:port" of a datacenter's agent (the first datacenter's by default)."""
        return f"{self.scheme}://{self.address(datacenter)}"

    def address(self, datacenter: str | None = None) -> str:
        """ "host:port" of a datacenter's agent (the first datacenter's by default)."""
        name = datacenter or self._names[0]
        if name not in self._ports:
            known = ", ".join(self._names)
            raise KeyError(
                f"no agent for datacenter {name!r} (started: {bool(self._ports)}; {known})"
            )
        host = _reachable(self._host)
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self._ports[name]}"

    async def start(self) -> None:
        if self._state is not None:
            raise RuntimeError("the registry is already started")
        journal = Journal(self._data_dir) if self._data_dir is not None else None
        state = RegistryState(self._names, _reachable(self._host), journal=journal)
        self._state = state
        try:
            for i, dc in enumerate(state):
                port = self._port + i if self._port else 0
                runner = web.AppRunner(
                    build_app(state, dc, self._acl),
                    access_log=None,
                    shutdown_timeout=_SHUTDOWN_GRACE_S,
                )
                await runner.setup()
                self._runners.append(runner)
                try:
                    await web.TCPSite(runner, self._host, port, ssl_context=self._ssl).start()
                except OSError as e:
                    raise ListenError(
                        f"datacenter {dc.name}: cannot listen on {self._host}:{port}: {e.strerror}"
                    ) from e
                self._ports[dc.name] = int(runner.addresses[0][1])
                checker = CheckRunner(dc)
                checker.start()
                self._checkers.append(checker)
        except BaseException:
            await self.stop()
            raise
        for name in self._names:
            log.info("registry agent started", datacenter=name, address=self.address(name))

    async def stop(self) -> None:
        """Release blocking queries, stop checks and listeners. Safe to call twice."""
        if self._state is None:
            return
        self._state.close()
        for checker in self._checkers:
            await checker.stop()
        for runner in self._runners:
            await runner.cleanup()
        self._state = None
        self._runners.clear()
        self._checkers.clear()
        self._ports.clear()
        log.info("registry stopped")

    async def __aenter__(self) -> EmbeddedRegistry:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def run_registry(
    datacenters: Sequence[str],
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    acl: AclConfig | None = None,
    tls: TlsIdentity | None = None,
    verify_incoming: bool = False,
    data_dir: Path | None = None,
) -> None:
    """Serve until cancelled, SIGINT or SIGTERM; print each agent's URL on start."""
    async with EmbeddedRegistry(
        datacenters,
        host=host,
        port=port,
        acl=acl,
        tls=tls,
        verify_incoming=verify_incoming,
        data_dir=data_dir,
    ) as registry:
        for name in registry.datacenters:
            print(f"kvmesh registry: {name} {registry.url(name)}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        handled = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Not available off the main thread or on Windows: then only cancellation stops us.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
        try:
            await stop.wait()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)


def _server_ssl(identity: TlsIdentity, verify_incoming: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    directory = identity.directory
    context.load_cert_chain(
        directory / certs.cert_file(identity.role), directory / certs.key_file(identity.role)
    )
    if verify_incoming:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=identity.ca_pem.decode())
    return context


def _reachable(host: str) -> str:
    """An address clients can connect to for a listener bound to `host`."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
