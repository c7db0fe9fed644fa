"""What the control plane asks of a cluster: how many replicas run, add some, remove some.

One `Actuator` per cluster (a Consul datacenter). Two implementations:

- `services/controlplane/local.py` — `LocalActuator`: worker processes on this machine, the
  embedded default (`kvmesh up`);
- `services/controlplane/kubernetes.py` — `KubernetesActuator`: one Deployment per
  (model, tier), scaled through the official `kubernetes` client.

The control plane drains a replica (`drain.py`: NOT_SERVING -> deregister -> in-flight requests
finish) *before* it calls `remove`, so an actuator only has to stop what is already idle.
Actuators raise `ActuatorError` with a sentence that says what failed; the reconciler logs it,
records an event and retries on its next pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class ActuatorError(Exception):
    """An actuator could not do what it was asked; the message says what and why."""


@dataclass(frozen=True, slots=True)
class Replica:
    """One worker an actuator started (or, for Kubernetes, one pod of the Deployment)."""

    worker_id: str  # the id the worker registers with (meta `worker_id`); "" while starting
    model: str
    tier: str  # "prefill" | "decode"
    name: str  # the actuator's own handle: a process name, a pod name
    address: str = ""  # gRPC host:port once known
    ready: bool = False  # serving (the worker printed its ready line / the pod is Ready)


class Actuator(Protocol):
    """One cluster's hands. Every method is safe to call again after an `ActuatorError`."""

    @property
    def cluster(self) -> str: ...

    @property
    def capacity(self) -> int:
        """How many replicas (all models and tiers together) this cluster can hold."""
        ...

    async def replicas(self, model: str, tier: str) -> list[Replica]:
        """The replicas of (model, tier) that exist now, starting ones included."""
        ...

    async def add(self, model: str, tier: str, count: int) -> list[Replica]:
        """Start `count` more replicas; returns without waiting for them to serve."""
        ...

    async def remove(self, model: str, tier: str, names: Sequence[str]) -> None:
        """Stop these replicas (by `Replica.name`); the caller has drained them."""
        ...

    async def close(self) -> None:
        """Release what the actuator holds (a local actuator stops its processes)."""
        ...
