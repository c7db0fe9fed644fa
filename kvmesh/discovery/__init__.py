"""Service discovery: a Consul client, and an embedded Consul-compatible registry."""

from kvmesh.discovery.client import (
    DEFAULT_ADDRESS,
    Discovery,
    DiscoveryError,
    KvEntry,
    Registration,
    ServiceInstance,
)
from kvmesh.discovery.registrar import Registrar

__all__ = [
    "DEFAULT_ADDRESS",
    "Discovery",
    "DiscoveryError",
    "KvEntry",
    "Registrar",
    "Registration",
    "ServiceInstance",
]
