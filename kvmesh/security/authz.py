"""Who may call which RPC: one table, checked on every call of a mutual-TLS server.

The caller's role comes from its certificate (`tls.peer_role`). Health checks and reflection
are open to anyone who completes the handshake; a method missing from the table is refused
(a test checks that every method of every kvmesh service is in it). docs/security.md shows
the same table.
"""

from __future__ import annotations

from kvmesh.errors import AuthorizationError
from kvmesh.security.roles import Role

EDGE, ROUTER, PREFILL, DECODE = Role.EDGE, Role.ROUTER, Role.PREFILL, Role.DECODE
AUTOSCALER, CONTROLPLANE, ADMIN = Role.AUTOSCALER, Role.CONTROLPLANE, Role.ADMIN

OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")

_OBSERVERS = frozenset({ROUTER, AUTOSCALER, CONTROLPLANE, ADMIN})  # worker state and load

POLICY: dict[str, frozenset[Role]] = {
    # The router's API: the edge, and people and programs with the admin identity.
    "/kvmesh.v1.Generation/Generate": frozenset({EDGE, ADMIN}),
    "/kvmesh.v1.Generation/ListModels": frozenset({EDGE, ADMIN}),
    "/kvmesh.v1.Generation/ExplainRoute": frozenset({EDGE, ADMIN}),
    # Workers: only routers run requests on them.
    "/kvmesh.v1.Prefill/Prefill": frozenset({ROUTER}),
    "/kvmesh.v1.Decode/Decode": frozenset({ROUTER}),
    # The KV plane: only decode workers read a prefill worker's KV; leases are released by
    # the router (a request that failed) or by the decode worker that read the blocks.
    "/kvmesh.v1.KvTransfer/GetAgentMetadata": frozenset({DECODE}),
    "/kvmesh.v1.KvTransfer/ReleaseLease": frozenset({ROUTER, DECODE}),
    "/kvmesh.v1.KvTransfer/GetTransferStats": _OBSERVERS,
    "/kvmesh.v1.Worker/GetInfo": _OBSERVERS,
    "/kvmesh.v1.Worker/WatchKvEvents": _OBSERVERS,
    "/kvmesh.v1.Worker/GetKvSnapshot": _OBSERVERS,
    "/kvmesh.v1.Worker/WatchLoad": _OBSERVERS,
    "/kvmesh.v1.Worker/Drain": frozenset({CONTROLPLANE, ADMIN}),
    # Admin APIs.
    "/kvmesh.v1.Autoscaler/GetPolicy": frozenset({CONTROLPLANE, ADMIN}),
    "/kvmesh.v1.Autoscaler/SetPolicy": frozenset({CONTROLPLANE, ADMIN}),
    "/kvmesh.v1.Autoscaler/ListDecisions": frozenset({CONTROLPLANE, ADMIN}),
    "/kvmesh.v1.ControlPlane/ListClusters": frozenset({ADMIN}),
    "/kvmesh.v1.ControlPlane/ListWorkers": frozenset({ADMIN}),
    "/kvmesh.v1.ControlPlane/ListDeployments": frozenset({ADMIN}),
    "/kvmesh.v1.ControlPlane/Scale": frozenset({ADMIN}),
    "/kvmesh.v1.ControlPlane/DrainWorker": frozenset({ADMIN}),
    "/kvmesh.v1.ControlPlane/CordonCluster": frozenset({ADMIN}),
    "/kvmesh.v1.ControlPlane/UncordonCluster": frozenset({ADMIN}),
    "/kvmesh.v1.ControlPlane/ListEvents": frozenset({ADMIN}),
}


def is_open(method: str) -> bool:
    return method.lstrip("/").partition("/")[0] in OPEN_SERVICES


def authorize(method: str, caller: Role | None) -> None:
    """Raise AuthorizationError (PERMISSION_DENIED) unless `caller` may call `method`."""
    if is_open(method):
        return
    allowed = POLICY.get(method)
    if allowed is None:
        raise AuthorizationError(f"{method} is not in the authorization table: no role may call it")
    if caller in allowed:
        return
    needed = " or ".join(sorted(r.value for r in allowed))
    who = f"the {caller.value} identity" if caller else "a caller with no kvmesh identity"
    raise AuthorizationError(f"{method} needs the {needed} role; it was called by {who}")
