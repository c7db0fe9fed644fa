"""The roles a kvmesh process plays, and their SPIFFE-style identities.

A certificate names its holder's role in a URI subject alternative name,
`spiffe://kvmesh/<cluster>/<role>`, as SPIFFE does: the identity is the role, not the host,
so authorization reads it from the peer's certificate and never from an address.
"""

from __future__ import annotations

from enum import Enum

from kvmesh.errors import InvalidRequestError

TRUST_DOMAIN = "kvmesh"


class Role(str, Enum):
    EDGE = "edge"
    ROUTER = "router"
    PREFILL = "prefill"
    DECODE = "decode"
    AUTOSCALER = "autoscaler"
    CONTROLPLANE = "controlplane"
    REGISTRY = "registry"
    ADMIN = "admin"


def spiffe_id(cluster: str, role: Role) -> str:
    if not cluster or "/" in cluster:
        raise InvalidRequestError(f"a cluster name is one non-empty path segment, got {cluster!r}")
    return f"spiffe://{TRUST_DOMAIN}/{cluster}/{role.value}"


def parse_spiffe_id(uri: str) -> tuple[str, Role]:
    """(cluster, role) of `spiffe://kvmesh/<cluster>/<role>`; InvalidRequestError otherwise."""
    prefix = f"spiffe://{TRUST_DOMAIN}/"
    cluster, _, role = uri.removeprefix(prefix).partition("/")
    if not uri.startswith(prefix) or not cluster or "/" in role:
        raise InvalidRequestError(f"not a kvmesh identity: {uri!r}")
    try:
        return cluster, Role(role)
    except ValueError:
        raise InvalidRequestError(f"unknown role {role!r} in {uri!r}") from None
