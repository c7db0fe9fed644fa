"""Speculative decoding as the workers saw it during a `kvmesh bench` run.

`kvmesh bench --worker-metrics HOST:PORT` (repeatable) reads each worker's Prometheus endpoint
before and after the run; the difference of its speculation counters
(`kvmesh_engine_spec_*_total`, exported by the engine) says how many drafts were proposed and
accepted while the load ran: the acceptance rate and the tokens each verify step emitted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kvmesh.bench.load.errors import BenchError
from kvmesh.telemetry.scrape import scrape, total

_COUNTERS = {
    "verifications": "kvmesh_engine_spec_verifications_total",
    "draft_tokens": "kvmesh_engine_spec_draft_tokens_total",
    "accepted_tokens": "kvmesh_engine_spec_accepted_tokens_total",
}


@dataclass(frozen=True, slots=True)
class SpeculationStats:
    verifications: float
    draft_tokens: float
    accepted_tokens: float

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def tokens_per_verification(self) -> float | None:
        """Accepted drafts plus the model's own token, per verify step of a sequence."""
        if not self.verifications:
            return None
        return (self.accepted_tokens + self.verifications) / self.verifications

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "acceptance_rate": self.acceptance_rate,
            "accepted_tokens_per_verification": (
                self.accepted_tokens / self.verifications if self.verifications else None
            ),
            "tokens_per_verification": self.tokens_per_verification,
        }

    def describe(self) -> str:
        if not self.verifications:
            return "no drafts verified (is --speculate on for these workers?)"
        return (
            f"acceptance {self.acceptance_rate or 0:.1%} ({self.accepted_tokens:.0f} of "
            f"{self.draft_tokens:.0f} drafts), {self.tokens_per_verification:.2f} tokens per "
            f"verify step ({self.verifications:.0f} steps)"
        )


async def read_counters(addresses: Sequence[str]) -> SpeculationStats:
    """The workers' speculation counters, summed over `addresses` (host:port of /metrics)."""
    sums = dict.fromkeys(_COUNTERS, 0.0)
    samples = await asyncio.gather(*(_scrape(address) for address in addresses))
    for sample in samples:
        for field, name in _COUNTERS.items():
            sums[field] += total(sample, name)
    return SpeculationStats(**sums)


def difference(before: SpeculationStats, after: SpeculationStats) -> SpeculationStats:
    return SpeculationStats(
        after.verifications - before.verifications,
        after.draft_tokens - before.draft_tokens,
        after.accepted_tokens - before.accepted_tokens,
    )


async def _scrape(address: str) -> dict[str, float]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BenchError(f"--worker-metrics takes host:port, got {address!r}")
    try:
        return await scrape(int(port), host)
    except Exception as e:
        raise BenchError(f"cannot read the metrics of worker {address}: {e}") from e
