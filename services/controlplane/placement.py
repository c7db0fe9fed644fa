"""Where the replicas of one (model, tier) go: a pure function of the clusters' state.

    place(total, clusters) -> {cluster: replicas}

- A cluster that is cordoned, unhealthy (no router serving the model) or has no room gets none,
  except what an operator pinned there (`pinned`: `kvmesh ctl scale --cluster`), which it always
  gets; pinned replicas count toward `total`.
- Spread (active-active): each open cluster first gets one replica, busiest first, while the
  total lasts, so that losing a cluster never loses the whole tier.
- The rest follow demand: one at a time to the open cluster with the highest
  `weight / (replicas + 1)` (D'Hondt), where the weight is the cluster's demand (requests in
  flight and queued there) or, when nothing is in flight anywhere, its free capacity. Ties keep
  replicas where they are (the current count), then go by name, so a steady state does not move.
- A cluster never gets more than `room` (capacity left after the other deployments); what fits
  nowhere is reported as `unplaced`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ClusterSlot:
    """One cluster as placement sees it, for one (model, tier)."""

    name: str
    room: int  # replicas of this (model, tier) the cluster can hold: capacity - other deployments
    open: bool = True  # neither cordoned nor unhealthy
    demand: float = 0.0  # load of this (model, tier) observed in the cluster
    current: int = 0  # replicas there now
    pinned: int | None = None  # an operator's fixed count


@dataclass(frozen=True, slots=True)
class Placement:
    replicas: dict[str, int] = field(default_factory=dict)
    unplaced: int = 0


def place(total: int, clusters: Sequence[ClusterSlot]) -> Placement:
    if total < 0:
        raise ValueError(f"total must not be negative, not {total}")
    replicas = {c.name: 0 for c in clusters}
    left = total
    for c in clusters:
        if c.pinned is not None:
            replicas[c.name] = c.pinned
            left -= c.pinned
    left = max(left, 0)
    free = [c for c in clusters if c.pinned is None and c.open and c.room > 0]
    any_demand = any(c.demand > 0 for c in free)

    def weight(c: ClusterSlot) -> float:
        return c.demand if any_demand else float(c.room)

    for c in sorted(free, key=lambda c: (-c.demand, -c.current, c.name)):
        if left == 0:
            break
        replicas[c.name] = 1
        left -= 1
    while left > 0:
        room = sorted((c for c in free if replicas[c.name] < c.room), key=lambda c: c.name)
        if not room:
            break
        best = max(  # the first of equals wins: by name
            room,
            key=lambda c: (
                weight(c) / (replicas[c.name] + 1),
                replicas[c.name] < c.current,  # keep what is already there
            ),
        )
        replicas[best.name] += 1
        left -= 1
    return Placement(replicas, unplaced=left)
