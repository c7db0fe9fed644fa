"""The spill header: gRPC request metadata between the edge and a router's `Generate`.

`x-kvmesh-spill: 1` — the caller has other clusters to try (the edge sends it on every attempt
but the last) and prefers a refusal now to waiting here: with it, a router that has no decode
worker answers UNAVAILABLE at once instead of waking the tier, and a saturated router answers
RESOURCE_EXHAUSTED instead of queueing. Without it the router never sheds.
"""

from __future__ import annotations

from collections.abc import Iterable

SPILL_KEY = "x-kvmesh-spill"
SPILL_YES = "1"


def wants_spill(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether invocation metadata carries `x-kvmesh-spill: 1`."""
    return any(key == SPILL_KEY and value == SPILL_YES for key, value in metadata or ())
