"""The embedded registry: Consul's HTTP API, the part kvmesh uses, served in-process.

For a laptop, CI or a single host, where no Consul runs: the same client code (py-consul, and
`kvmesh.discovery.Discovery` on top of it) talks to it as to a Consul agent — same paths, JSON
shapes, blocking queries (`index`, `wait`, `X-Consul-Index`), several datacenters, TTL and gRPC
checks. docs/registry.md lists what is served and where it differs from Consul.
"""

from kvmesh.discovery.registry.errors import (
    BadRequestError,
    ListenError,
    NotFoundError,
    RegistryError,
    UnknownDatacenterError,
    UnsupportedError,
    ValueTooLargeError,
)
from kvmesh.discovery.registry.server import DEFAULT_PORT, EmbeddedRegistry, run_registry

__all__ = [
    "DEFAULT_PORT",
    "BadRequestError",
    "EmbeddedRegistry",
    "ListenError",
    "NotFoundError",
    "RegistryError",
    "UnknownDatacenterError",
    "UnsupportedError",
    "ValueTooLargeError",
    "run_registry",
]
