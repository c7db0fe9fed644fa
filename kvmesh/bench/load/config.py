"""A run's whole configuration: one frozen dataclass, checked once, written into the results.

`BenchConfig` is the Python API (other benchmarks build it directly); `config_from_options`
builds it from the `kvmesh bench` command's options and turns every inconsistency into a
`ConfigError` that says which option is wrong.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kvmesh.bench.load.arrivals import Arrivals, ClosedLoop, OpenLoop
from kvmesh.bench.load.errors import ConfigError
from kvmesh.bench.load.workloads import (
    WORKLOADS,
    RandomPrompts,
    SharedPrefix,
    TokenRange,
    Workload,
    scaled,
)

DEFAULT_TOKENIZER_MODEL = "smollm2"


@dataclass(frozen=True, slots=True)
class Slo:
    """Service-level objectives; a request is "good" when it meets every one that is set.

    The ITL objective is on a request's mean inter-token latency (its TPOT), as DistServe and
    vLLM define goodput: one slow chunk does not fail a request, a slow stream does.
    """

    ttft_ms: float | None = None
    itl_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def is_set(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.itl_ms, self.e2e_ms))


@dataclass(frozen=True, slots=True)
class BenchConfig:
    target: str  # "http://host:port" for protocol "http", "host:port" for "grpc"
    protocol: Literal["http", "grpc"] = "http"
    workload: Workload = field(default_factory=SharedPrefix)
    arrivals: Arrivals = field(default_factory=lambda: OpenLoop(rate=1.0))
    model: str | None = None  # None: the first model the server lists
    num_requests: int | None = None  # None: every request of the workload
    duration_s: float | None = None  # no new requests after this long
    seed: int = 0
    max_in_flight: int = 256  # open loop's safety cap; waits beyond it are counted
    request_timeout_s: float = 300.0
    prompt_format: Literal["tokens", "text"] = "tokens"
    tokenizer: str | None = None  # text prompts: a tokenizer directory (default: smollm2's)
    tokens: TokenRange = field(default_factory=TokenRange)
    slo: Slo = Slo()
    api_key: str | None = None  # HTTP: sent as a bearer token
    progress: bool = False  # a progress line on stderr while running
    worker_metrics: tuple[str, ...] = ()  # workers' /metrics (host:port): speculation counters

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent setting."""
        if self.protocol not in ("http", "grpc"):
            raise ConfigError(f"protocol must be http or grpc, not {self.protocol!r}")
        if self.protocol == "http" and not self.target.startswith(("http://", "https://")):
            raise ConfigError(f"--url must start with http:// or https://, got {self.target!r}")
        if self.protocol == "grpc" and (not self.target or "://" in self.target):
            raise ConfigError(f"--grpc must be host:port, got {self.target!r}")
        _check_arrivals(self.arrivals)
        _check_workload(self.workload)
        for name, value in (
            ("num_requests", self.num_requests), ("duration", self.duration_s),
            ("max_in_flight", self.max_in_flight), ("request_timeout", self.request_timeout_s),
            ("slo_ttft_ms", self.slo.ttft_ms), ("slo_itl_ms", self.slo.itl_ms),
            ("slo_e2e_ms", self.slo.e2e_ms),
        ):  # fmt: skip
            if value is not None and not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.prompt_format not in ("tokens", "text"):
            raise ConfigError(f"prompt format must be tokens or text, not {self.prompt_format!r}")
        if not 0 <= self.tokens.low < self.tokens.high:
            raise ConfigError(f"token range [{self.tokens.low}, {self.tokens.high}) is empty")

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["workload"] = {"name": self.workload.name, **dataclasses.asdict(self.workload)}
        mode = "open" if isinstance(self.arrivals, OpenLoop) else "closed"
        out["arrivals"] = {"mode": mode, **dataclasses.asdict(self.arrivals)}
        if math.isinf(out["arrivals"].get("rate", 0)):
            out["arrivals"]["rate"] = "inf"  # JSON has no infinity
        out["tokens"] = dataclasses.asdict(self.tokens)
        out["slo"] = dataclasses.asdict(self.slo)
        out["api_key"] = "***" if self.api_key else None
        return out


def _check_arrivals(arrivals: Arrivals) -> None:
    if isinstance(arrivals, ClosedLoop):
        if arrivals.concurrency < 1:
            raise ConfigError(f"--concurrency must be at least 1, got {arrivals.concurrency}")
        return
    if math.isnan(arrivals.rate) or arrivals.rate <= 0:
        raise ConfigError(f"--rate must be positive (or inf), got {arrivals.rate}")
    if arrivals.distribution not in ("poisson", "gamma"):
        raise ConfigError(f"--arrival must be poisson or gamma, not {arrivals.distribution!r}")
    if not arrivals.burstiness > 0 or math.isinf(arrivals.burstiness):
        raise ConfigError(f"--burstiness must be positive, got {arrivals.burstiness}")


def _check_workload(workload: Workload) -> None:
    for f in dataclasses.fields(workload):
        value = getattr(workload, f.name)
        if f.name == "range_ratio":
            if not 0 <= value <= 1:
                raise ConfigError(f"--range-ratio must be within [0, 1], got {value}")
        elif f.name == "zipf":
            if not 0 <= value < float("inf"):
                raise ConfigError(f"--zipf must be >= 0 (0: uniform), got {value}")
        elif value < 1:
            raise ConfigError(f"--{f.name.replace('_', '-')} must be at least 1, got {value}")


# The workload options of the CLI: every workload field but the random workload's count, which
# is --num-requests.
WORKLOAD_OPTIONS = sorted(
    {f.name for cls in WORKLOADS.values() for f in dataclasses.fields(cls)} - {"num_prompts"}
)


def config_from_options(options: Mapping[str, Any]) -> BenchConfig:
    """`kvmesh bench`'s options (click's parameter names) as a checked BenchConfig."""
    o = dict(options)
    url, grpc = o.pop("url"), o.pop("grpc")
    if (url is None) == (grpc is None):
        raise ConfigError("give exactly one target: --url http://host:port or --grpc host:port")
    scale = o.pop("scale")
    if not scale > 0 or math.isinf(scale):
        raise ConfigError(f"--scale must be positive, got {scale}")
    arrivals = _arrivals(o.pop("rate"), o.pop("arrival"), o.pop("burstiness"), o.pop("concurrency"))
    spec = scaled(_workload(o.pop("workload"), {k: o.pop(k) for k in WORKLOAD_OPTIONS}), scale)
    if isinstance(spec, RandomPrompts) and o["num_requests"] is not None:
        spec = dataclasses.replace(spec, num_prompts=o["num_requests"])
    config = BenchConfig(
        target=url if url is not None else grpc,
        protocol="http" if url is not None else "grpc",
        workload=spec,
        arrivals=arrivals,
        slo=Slo(o.pop("slo_ttft_ms"), o.pop("slo_itl_ms"), o.pop("slo_e2e_ms")),
        duration_s=o.pop("duration"),
        request_timeout_s=o.pop("request_timeout"),
        **o,  # named as BenchConfig's fields
    )
    config.validate()
    return config


def _arrivals(
    rate: float | None, arrival: str, burstiness: float | None, concurrency: int | None
) -> Arrivals:
    if (rate is None) == (concurrency is None):
        raise ConfigError("give exactly one of --rate R (open loop) or --concurrency N (closed)")
    if arrival not in ("poisson", "gamma"):
        raise ConfigError(f"--arrival must be poisson or gamma, not {arrival!r}")
    if burstiness is not None and arrival != "gamma":
        raise ConfigError("--burstiness applies to --arrival gamma only")
    if concurrency is not None:
        if arrival == "gamma":
            raise ConfigError("--arrival gamma applies to --rate only")
        return ClosedLoop(concurrency)
    assert rate is not None
    distribution: Literal["poisson", "gamma"] = "gamma" if arrival == "gamma" else "poisson"
    return OpenLoop(rate, distribution=distribution, burstiness=burstiness or 1.0)


def _workload(name: str, options: Mapping[str, Any]) -> Workload:
    cls = WORKLOADS.get(name)
    if cls is None:
        raise ConfigError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in options.items() if v is not None}
    foreign = sorted(set(given) - fields)
    if foreign:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in foreign)
        raise ConfigError(f"not options of the {name} workload: {flags}")
    return cls(**given)
