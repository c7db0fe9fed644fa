"""`kvmesh bench`: an open-loop load generator for OpenAI-compatible servers and kvmesh's gRPC API.

The same workloads, arrival processes and metrics for every system measured (our edge, vLLM,
SGLang, the router over gRPC), so their numbers can stand side by side:

    from kvmesh.bench import load

    config = load.BenchConfig(
        target="http://127.0.0.1:8000",
        workload=load.scaled(load.SharedPrefix(), 0.1),
        arrivals=load.OpenLoop(rate=2.0),
        num_requests=50,
    )
    result = load.run(config)
    print(load.render_summary(result))
    print(load.render_comparison({"least-load": result, "cache-aware": other}))

Modules: `workloads` (what is sent), `arrivals` (when), `targets` with `http_target` and
`grpc_target` (to whom), `runner` (sending and timing), `metrics` (records and summary),
`report` and `plots` (output), `config` (the one configuration), `errors` (the one error tree).
"""

from kvmesh.bench.load.arrivals import ClosedLoop, OpenLoop
from kvmesh.bench.load.config import BenchConfig, Slo, config_from_options
from kvmesh.bench.load.errors import (
    BenchError,
    ConfigError,
    RequestFailedError,
    TargetError,
    TargetUnreachableError,
)
from kvmesh.bench.load.metrics import BenchResult, RequestRecord, Summary
from kvmesh.bench.load.plots import write_plots  # matplotlib itself loads only when plotting
from kvmesh.bench.load.report import render_comparison, render_summary, write_json
from kvmesh.bench.load.runner import run, run_async
from kvmesh.bench.load.workloads import (
    WORKLOADS,
    CodeEdit,
    MultiTurn,
    RandomPrompts,
    SharedPrefix,
    TokenRange,
    scaled,
)

__all__ = [
    "WORKLOADS",
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "ClosedLoop",
    "CodeEdit",
    "ConfigError",
    "MultiTurn",
    "OpenLoop",
    "RandomPrompts",
    "RequestFailedError",
    "RequestRecord",
    "SharedPrefix",
    "Slo",
    "Summary",
    "TargetError",
    "TargetUnreachableError",
    "TokenRange",
    "config_from_options",
    "render_comparison",
    "render_summary",
    "run",
    "run_async",
    "scaled",
    "write_json",
    "write_plots",
]
