"""The sim engine's own settings, from `--engine-arg KEY=VALUE` (`EngineConfig.options`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kvmesh.engine.config import parse_engine_args
from kvmesh.engine.sim.gpus import CALIBRATION, GPUS, Calibration
from kvmesh.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class SimOptions:
    gpu: str = "H100"
    """Which GPU's roofline and memory: H100, H200, A100, L40S."""
    speed: float = 1.0
    """Run this many times faster than the modeled GPU (10: a 50 ms step sleeps 5 ms)."""
    noise: float = 0.0
    """Relative standard deviation of lognormal noise on each step's time (mean 1)."""
    seed: int | None = None
    """Seed of the token ids and the noise; None: `EngineConfig.seed`."""
    num_blocks: int | None = None
    """KV blocks; None: `--num-blocks`, else the GPU's memory after the weights."""
    mem_fraction: float = 0.9
    """Share of the GPU's memory left after the weights that the KV pool takes."""
    link_gbps: float = 50.0
    """The KV transfer link of an ENGINE-mode import, in gigaBYTES/s (50: one 400 Gb/s NIC)."""
    prefill_eff: float | None = None
    """Overrides the calibration table's prefill efficiency (a fraction of peak FLOP/s)."""
    decode_eff: float | None = None
    """Overrides the calibration table's decode efficiency (a fraction of HBM bandwidth)."""
    overhead_ms: float | None = None
    """Overrides the calibration table's per-step overhead, in milliseconds."""

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> SimOptions:
        """Read `--engine-arg` values; InvalidRequestError naming a bad or unknown key."""
        values = parse_engine_args("sim", options, _CONVERTERS)
        parsed = cls(**values)
        parsed._check()
        return parsed

    def calibration(self) -> Calibration:
        base = CALIBRATION[self.gpu]
        overrides: dict[str, Any] = {}
        if self.prefill_eff is not None:
            overrides["prefill_efficiency"] = self.prefill_eff
        if self.decode_eff is not None:
            overrides["decode_efficiency"] = self.decode_eff
        if self.overhead_ms is not None:
            overrides["step_overhead_s"] = self.overhead_ms / 1000
        if not overrides:
            return base
        return dataclasses.replace(base, **overrides, source=f"{base.source}; overridden")

    def _check(self) -> None:
        checks = [
            (self.gpu in GPUS, f"gpu must be one of {', '.join(GPUS)}, got {self.gpu!r}"),
            (self.speed > 0, "speed must be positive"),
            (self.noise >= 0, "noise must be >= 0"),
            (self.num_blocks is None or self.num_blocks >= 1, "num_blocks must be >= 1"),
            (0 < self.mem_fraction <= 1, "mem_fraction must be in (0, 1]"),
            (self.link_gbps > 0, "link_gbps must be positive"),
            (self.prefill_eff is None or 0 < self.prefill_eff <= 1, "prefill_eff: (0, 1]"),
            (self.decode_eff is None or 0 < self.decode_eff <= 1, "decode_eff: (0, 1]"),
            (self.overhead_ms is None or self.overhead_ms >= 0, "overhead_ms must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(f"sim engine option: {message}")


def _gpu(text: str) -> str:
    return text.strip().upper()


_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "gpu": _gpu,
    "speed": float,
    "noise": float,
    "seed": int,
    "num_blocks": int,
    "mem_fraction": float,
    "link_gbps": float,
    "prefill_eff": float,
    "decode_eff": float,
    "overhead_ms": float,
}
