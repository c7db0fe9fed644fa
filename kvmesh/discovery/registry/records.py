"""What the registry stores: nodes, services, checks, KV entries; and the definitions clients send.

Definitions (`ServiceDefinition`, `CheckDefinition`) are validated requests; records (`Service`,
`Check`, `KvEntry`) are the stored state with their raft-like create/modify indexes. Durations
are integer nanoseconds (see `durations`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CheckStatus = Literal["passing", "warning", "critical"]
CheckKind = Literal["ttl", "grpc", ""]  # "": the node's serfHealth check
CHECK_STATUSES: tuple[CheckStatus, ...] = ("passing", "warning", "critical")

PASSING: CheckStatus = "passing"
WARNING: CheckStatus = "warning"
CRITICAL: CheckStatus = "critical"


@dataclass(frozen=True, slots=True)
class Node:
    """The one node of a datacenter: its agent."""

    node_id: str
    name: str
    address: str
    datacenter: str
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TaggedAddress:
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class CheckDefinition:
    """A TTL or gRPC check, as registered (inside a service or on its own)."""

    check_id: str = ""
    name: str = ""
    notes: str = ""
    status: CheckStatus | None = None  # initial status (None: critical); re-registered: kept
    service_id: str = ""  # only for /v1/agent/check/register
    ttl_ns: int = 0
    grpc: str = ""  # "host:port" or "host:port/service"
    grpc_use_tls: bool = False
    tls_server_name: str = ""
    interval_ns: int = 0
    timeout_ns: int = 0
    deregister_after_ns: int = 0

    @property
    def kind(self) -> CheckKind:
        return "grpc" if self.grpc else "ttl"


@dataclass(frozen=True, slots=True)
class ServiceDefinition:
    service_id: str
    name: str
    tags: tuple[str, ...] = ()
    address: str = ""
    port: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    tagged_addresses: dict[str, TaggedAddress] = field(default_factory=dict)
    weight_passing: int = 1
    weight_warning: int = 1
    enable_tag_override: bool = False
    checks: tuple[CheckDefinition, ...] = ()


@dataclass(slots=True)
class Service:
    definition: ServiceDefinition
    create_index: int
    modify_index: int

    @property
    def service_id(self) -> str:
        return self.definition.service_id

    @property
    def name(self) -> str:
        return self.definition.name


@dataclass(slots=True)
class Check:
    """A check's state. A new definition for the same id makes a new `Check` object."""

    check_id: str
    name: str
    definition: CheckDefinition | None  # None: the node's serfHealth check
    status: CheckStatus
    output: str
    service_id: str
    service_name: str
    service_tags: tuple[str, ...]
    create_index: int
    modify_index: int
    ttl_deadline: float | None = None  # monotonic time at which a TTL check goes critical
    critical_since: float | None = None  # monotonic time it went critical

    @property
    def kind(self) -> CheckKind:
        return "" if self.definition is None else self.definition.kind

    @property
    def notes(self) -> str:
        return "" if self.definition is None else self.definition.notes


@dataclass(frozen=True, slots=True)
class KvEntry:
    key: str
    value: bytes | None  # None: written with an empty body (Consul answers "Value": null)
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0
