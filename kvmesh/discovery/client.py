"""Service discovery over Consul's HTTP API (py-consul's asyncio client).

The same code talks to a Consul agent and to kvmesh's embedded registry. What kvmesh needs:

- register a service instance with a health check — a TTL check kept passing by a heartbeat
  task, or a gRPC check that the agent performs — and deregister it;
- the healthy instances of a service, and a watch that yields them whenever they change
  (blocking queries on `/v1/health/service/<name>?passing`);
- KV get / put / compare-and-set / delete and a watch on a key or prefix (dynamic settings);
- several datacenters: every read takes `datacenter`, and `datacenters()` lists them.

Errors from the HTTP layer become `DiscoveryError`s; watches retry with backoff and count
failures in `kvmesh_discovery_watch_errors_total` instead of ending.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import consul
import consul.aio
import structlog

from kvmesh.security import tls
from kvmesh.security.certs import CA_FILE, TARGET_NAME, cert_file, key_file
from kvmesh.telemetry import metrics

log = structlog.get_logger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:8500"
_MAX_BACKOFF_S = 5.0


class DiscoveryError(Exception):
    """The registry could not be reached or refused the request."""


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    service_id: str
    name: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    datacenter: str = ""

    @property
    def grpc_address(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def model(self) -> str:
        """The model it serves: meta `model`, else a `model=...` tag (routers), else ""."""
        if self.meta.get("model"):
            return self.meta["model"]
        for tag in self.tags:
            if tag.startswith("model="):
                return tag.removeprefix("model=")
        return ""


@dataclass(frozen=True, slots=True)
class Registration:
    """A service instance to register, with one health check: TTL or gRPC."""

    name: str
    service_id: str
    address: str
    port: int
    tags: Sequence[str] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    ttl_s: float | None = 2.0  # TTL check, kept passing by `Registrar`'s heartbeat
    grpc_check_interval_s: float | None = None  # or a gRPC health check the agent performs
    deregister_critical_after_s: float = 10.0  # a dead instance leaves the catalog after this

    @property
    def check_id(self) -> str:
        return f"service:{self.service_id}"

    @property
    def grpc_address(self) -> str:
        return f"{self.address}:{self.port}"


def _duration(seconds: float) -> str:
    return f"{max(int(seconds * 1000), 1)}ms"


def token_from_environment() -> str | None:
    """The registry token as Consul's tools find it: $CONSUL_HTTP_TOKEN, else the contents of
    the file $CONSUL_HTTP_TOKEN_FILE names."""
    token = os.environ.get("CONSUL_HTTP_TOKEN")
    if token:
        return token
    path = os.environ.get("CONSUL_HTTP_TOKEN_FILE")
    if path:
        with open(path) as f:
            return f.read().strip() or None
    return None


def _true(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if not value else value.strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True, slots=True)
class RegistryEndpoint:
    """Where a registry client connects, and how, as Consul's tools decide it.

    - The address: the argument, else `CONSUL_HTTP_ADDR`, else 127.0.0.1:8500. It may start
      with `http://` or `https://`; without a scheme, `CONSUL_HTTP_SSL=true` means HTTPS.
    - The CA that verifies an HTTPS registry: `CONSUL_CACERT`, else the CA of the process's
      TLS identity (`--tls-dir`), else the system's; `CONSUL_HTTP_SSL_VERIFY=false` turns
      verification off.
    - The client certificate (for a registry that verifies incoming connections):
      `CONSUL_CLIENT_CERT` and `CONSUL_CLIENT_KEY`, else the process's TLS identity.
    """

    host: str
    port: int
    scheme: str = "http"
    verify: bool | str = True
    cert: tuple[str, str] | None = None

    @property
    def host_port(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host_port}"

    @classmethod
    def parse(cls, address: str | None) -> RegistryEndpoint:
        address = address or os.environ.get("CONSUL_HTTP_ADDR") or DEFAULT_ADDRESS
        scheme, sep, rest = address.partition("://")
        if not sep:
            scheme, rest = ("https" if _true("CONSUL_HTTP_SSL") else "http"), address
        if scheme not in ("http", "https"):
            raise ValueError(f"registry address {address!r}: the scheme must be http or https")
        host, _, port = rest.rstrip("/").rpartition(":")
        if not port.isdigit():
            raise ValueError(f"registry address {address!r} is not [scheme://]host:port")
        host = host.strip("[]") or "127.0.0.1"
        identity = tls.current()
        verify: bool | str = os.environ.get("CONSUL_CACERT") or (
            str(identity.directory / CA_FILE) if identity is not None else True
        )
        if _true("CONSUL_HTTP_SSL_VERIFY") is False:
            verify = False
        cert: tuple[str, str] | None = None
        if os.environ.get("CONSUL_CLIENT_CERT") and os.environ.get("CONSUL_CLIENT_KEY"):
            cert = (os.environ["CONSUL_CLIENT_CERT"], os.environ["CONSUL_CLIENT_KEY"])
        elif identity is not None:
            cert = (
                str(identity.directory / cert_file(identity.role)),
                str(identity.directory / key_file(identity.role)),
            )
        return cls(host, int(port), scheme, verify, cert if scheme == "https" else None)


@dataclass(slots=True)
class KvEntry:
    key: str
    value: bytes
    modify_index: int
    flags: int = 0


class Discovery:
    """A client of one Consul agent (or the embedded registry)."""

    def __init__(self, address: str | None = None, *, token: str | None = None) -> None:
        """`token`: the ACL token every call carries; None: Consul's environment variables,
        `CONSUL_HTTP_TOKEN`, else the file `CONSUL_HTTP_TOKEN_FILE` names."""
        endpoint = RegistryEndpoint.parse(address)
        self.address = endpoint.url if endpoint.scheme == "https" else endpoint.host_port
        token = token if token is not None else token_from_environment()
        self._consul = consul.aio.Consul(
            host=endpoint.host,
            port=endpoint.port,
            token=token,
            scheme=endpoint.scheme,
            verify=endpoint.verify,
            cert=endpoint.cert,
        )

    async def close(self) -> None:
        await self._consul.close()

    async def __aenter__(self) -> Discovery:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- registration ----------------------------------------------------------------------------

    async def register(self, registration: Registration) -> None:
        r = registration
        check: dict[str, Any] = {
            "CheckID": r.check_id,
            "Name": f"{r.name} health",
            "DeregisterCriticalServiceAfter": _duration(r.deregister_critical_after_s),
        }
        if r.grpc_check_interval_s is not None:
            check |= {"GRPC": r.grpc_address, "Interval": _duration(r.grpc_check_interval_s)}
            if tls.current() is not None:  # the service serves mutual TLS only
                check |= {"GRPCUseTLS": True, "TLSServerName": TARGET_NAME}
        elif r.ttl_s is not None:
            check |= {"TTL": _duration(r.ttl_s)}
        else:
            raise ValueError("a registration needs a TTL or a gRPC check")
        await self._call(
            self._consul.agent.service.register(
                r.name,
                service_id=r.service_id,
                address=r.address,
                port=r.port,
                tags=list(r.tags),
                meta=dict(r.meta),
                check=check,
            )
        )

    async def deregister(self, service_id: str) -> None:
        await self._call(self._consul.agent.service.deregister(service_id))

    async def is_registered(self, service_id: str) -> bool:
        """Whether the agent knows the service instance (it may have restarted without it)."""
        return service_id in await self._call(self._consul.agent.services())

    async def pass_ttl(self, check_id: str, note: str | None = None) -> None:
        if not await self._call(self._consul.agent.check.ttl_pass(check_id, notes=note)):
            raise DiscoveryError(f"registry at {self.address} does not know check {check_id!r}")

    async def local_datacenter(self) -> str:
        info = await self._call(self._consul.agent.self())
        return str(info["Config"]["Datacenter"])

    async def datacenters(self) -> list[str]:
        return list(await self._call(self._consul.catalog.datacenters()))

    # -- health ------------------------------------------------------------------------------------

    async def healthy(
        self,
        service: str,
        *,
        datacenter: str | None = None,
        tag: str | None = None,
        index: int | None = None,
        wait_s: float | None = None,
    ) -> tuple[int, list[ServiceInstance]]:
        """Passing instances of `service`; with `index`, a blocking query (waits for a change)."""
        index_, nodes = await self._call(
            self._consul.health.service(
                service,
                passing=True,
                dc=datacenter,
                tag=tag,
                index=index,
                wait=_duration(wait_s) if wait_s is not None else None,
            )
        )
        return int(index_), [_instance(node) for node in nodes]

    async def watch(
        self,
        service: str,
        *,
        datacenter: str | None = None,
        tag: str | None = None,
        wait_s: float = 30.0,
    ) -> AsyncIterator[list[ServiceInstance]]:
        """Yield the passing instances now, then again each time they change."""
        index: int | None = None
        last: list[ServiceInstance] | None = None
        failures = 0
        metrics.zero(metrics.DISCOVERY_WATCH_ERRORS, service)
        while True:
            try:
                new_index, instances = await self.healthy(
                    service, datacenter=datacenter, tag=tag, index=index, wait_s=wait_s
                )
            except DiscoveryError as e:
                failures += 1
                metrics.DISCOVERY_WATCH_ERRORS.labels(service).inc()
                delay = min(_MAX_BACKOFF_S, 0.1 * 2**failures) * random.uniform(0.5, 1.0)
                log.warning("discovery watch failed; retrying", service=service, error=str(e))
                await asyncio.sleep(delay)
                continue
            failures = 0
            # Consul: an index that goes backwards means a reset; start over.
            index = new_index if index is None or new_index >= index else 0
            if instances != last:
                last = instances
                yield instances

    # -- KV ----------------------------------------------------------------------------------------

    async def kv_get(
        self, key: str, *, datacenter: str | None = None
    ) -> tuple[int, KvEntry | None]:
        index, item = await self._call(self._consul.kv.get(key, dc=datacenter))
        return int(index), _entry(item) if item else None

    async def kv_list(
        self, prefix: str, *, datacenter: str | None = None
    ) -> tuple[int, list[KvEntry]]:
        index, items = await self._call(self._consul.kv.get(prefix, recurse=True, dc=datacenter))
        return int(index), [_entry(i) for i in items or ()]

    async def kv_put(
        self,
        key: str,
        value: bytes | str,
        *,
        cas: int | None = None,
        datacenter: str | None = None,
    ) -> bool:
        """Write `key`; with `cas`, only if its ModifyIndex still equals it (0: create only)."""
        data = value.encode() if isinstance(value, str) else value
        return bool(await self._call(self._consul.kv.put(key, data, cas=cas, dc=datacenter)))

    async def kv_delete(
        self, key: str, *, cas: int | None = None, datacenter: str | None = None
    ) -> bool:
        return bool(await self._call(self._consul.kv.delete(key, cas=cas, dc=datacenter)))

    async def kv_watch(
        self, prefix: str, *, datacenter: str | None = None, wait_s: float = 30.0
    ) -> AsyncIterator[list[KvEntry]]:
        """Yield the entries under `prefix` now, then each time any of them changes."""
        index: int | None = None
        failures = 0
        metrics.zero(metrics.DISCOVERY_WATCH_ERRORS, prefix)
        while True:
            try:
                new_index, items = await self._call(
                    self._consul.kv.get(
                        prefix, recurse=True, dc=datacenter, index=index, wait=_duration(wait_s)
                    )
                )
            except DiscoveryError as e:
                failures += 1
                metrics.DISCOVERY_WATCH_ERRORS.labels(prefix).inc()
                log.warning("kv watch failed; retrying", prefix=prefix, error=str(e))
                await asyncio.sleep(min(_MAX_BACKOFF_S, 0.1 * 2**failures))
                continue
            failures = 0
            new_index = int(new_index)
            if index is None or new_index != index:
                index = new_index
                yield [_entry(i) for i in items or ()]

    # -- internals ---------------------------------------------------------------------------------

    async def _call(self, request: Any) -> Any:
        try:
            return await request
        except consul.ConsulException as e:
            raise DiscoveryError(f"registry at {self.address} refused: {e}") from e
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise DiscoveryError(f"registry at {self.address} unreachable: {e!r}") from e


def _instance(node: Mapping[str, Any]) -> ServiceInstance:
    service = node["Service"]
    address = service.get("Address") or node.get("Node", {}).get("Address", "")
    return ServiceInstance(
        service_id=service["ID"],
        name=service["Service"],
        address=address,
        port=int(service["Port"]),
        tags=tuple(service.get("Tags") or ()),
        meta=dict(service.get("Meta") or {}),
        datacenter=node.get("Node", {}).get("Datacenter", ""),
    )


def _entry(item: Mapping[str, Any]) -> KvEntry:
    value = item.get("Value")
    if isinstance(value, str):  # py-consul decodes base64 for us; be safe either way
        value = base64.b64decode(value)
    return KvEntry(
        key=item["Key"],
        value=value or b"",
        modify_index=int(item["ModifyIndex"]),
        flags=int(item.get("Flags") or 0),
    )
