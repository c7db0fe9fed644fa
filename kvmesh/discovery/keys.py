"""Every Consul KV key the mesh shares between services, in one place.

    kvmesh/autoscaler/policies/<model>/<tier>   scaling policy (JSON)    autoscaler, ctl
    kvmesh/autoscaler/desired/<model>/<tier>    desired count (JSON)     autoscaler -> control plane
    kvmesh/autoscaler/wake/<model>/<tier>       a request waits (JSON)   router -> autoscaler
    kvmesh/controlplane/cordon/<cluster>        cordoned (any value)     control plane -> edge
    kvmesh/controlplane/pinned/<model>/<tier>/<cluster>   an operator's count (JSON)

A model name may contain "/" (`org/name`); the tier (and cluster) are always the last segments.
Keys live in the primary datacenter's KV (the one the writer's agent belongs to unless a
datacenter is given), so one registry holds the whole mesh's dynamic settings.
"""

from __future__ import annotations

POLICY_PREFIX = "kvmesh/autoscaler/policies/"
DESIRED_PREFIX = "kvmesh/autoscaler/desired/"
WAKE_PREFIX = "kvmesh/autoscaler/wake/"
CORDON_PREFIX = "kvmesh/controlplane/cordon/"
PINNED_PREFIX = "kvmesh/controlplane/pinned/"


def desired_key(model: str, tier: str) -> str:
    return f"{DESIRED_PREFIX}{model}/{tier}"


def wake_key(model: str, tier: str) -> str:
    return f"{WAKE_PREFIX}{model}/{tier}"


def cordon_key(cluster: str) -> str:
    return f"{CORDON_PREFIX}{cluster}"


def pinned_key(model: str, tier: str, cluster: str) -> str:
    return f"{PINNED_PREFIX}{model}/{tier}/{cluster}"


def split_model_tier(key: str, prefix: str) -> tuple[str, str] | None:
    """(model, tier) of `<prefix><model>/<tier>`; None when the key has no such shape."""
    model, _, tier = key.removeprefix(prefix).rpartition("/")
    return (model, tier) if key.startswith(prefix) and model and tier else None
