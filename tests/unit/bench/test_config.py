"""The CLI's options become one checked BenchConfig; inconsistent ones are refused by name."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvmesh.bench.load.arrivals import ClosedLoop, OpenLoop
from kvmesh.bench.load.config import WORKLOAD_OPTIONS, BenchConfig, Slo, config_from_options
from kvmesh.bench.load.errors import ConfigError
from kvmesh.bench.load.workloads import MultiTurn, RandomPrompts, SharedPrefix


def options(**given: Any) -> dict[str, Any]:
    """What click passes when only `given` is on the command line."""
    defaults: dict[str, Any] = {
        "url": None, "grpc": None, "model": None, "workload": "shared-prefix", "scale": 1.0,
        "rate": None, "arrival": "poisson", "burstiness": None, "concurrency": None,
        "num_requests": None, "duration": None, "seed": 0, "max_in_flight": 256,
        "request_timeout": 300.0, "prompt_format": "tokens", "tokenizer": None,
        "slo_ttft_ms": None, "slo_itl_ms": None, "slo_e2e_ms": None, "api_key": None,
        "progress": True,
    }  # fmt: skip
    return defaults | dict.fromkeys(WORKLOAD_OPTIONS) | given


def test_a_shared_prefix_run_at_a_rate() -> None:
    config = config_from_options(
        options(url="http://h:1", rate=2.0, scale=0.5, groups=4, slo_ttft_ms=100.0, duration=9.0)
    )
    assert config.protocol == "http" and config.target == "http://h:1"
    assert config.arrivals == OpenLoop(rate=2.0)
    assert config.workload == SharedPrefix(
        groups=2, prompts_per_group=8, system_prompt_len=1024, question_len=64, output_len=128
    )
    assert config.slo == Slo(ttft_ms=100.0)
    assert config.duration_s == 9.0


def test_a_closed_loop_over_grpc() -> None:
    config = config_from_options(
        options(grpc="h:2", concurrency=4, workload="multi-turn", turns=2, output_len=8)
    )
    assert config.protocol == "grpc" and config.arrivals == ClosedLoop(4)
    assert config.workload == MultiTurn(turns=2, output_len=8)


def test_gamma_arrivals_take_a_burstiness() -> None:
    config = config_from_options(
        options(url="http://h:1", rate=1.0, arrival="gamma", burstiness=0.5)
    )
    assert config.arrivals == OpenLoop(rate=1.0, distribution="gamma", burstiness=0.5)


def test_the_random_workload_sends_num_requests_prompts() -> None:
    config = config_from_options(
        options(url="http://h:1", rate=1.0, workload="random", num_requests=7)
    )
    assert isinstance(config.workload, RandomPrompts) and config.workload.num_prompts == 7


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"rate": 1.0}, "exactly one target"),
        ({"url": "http://h:1", "grpc": "h:2", "rate": 1.0}, "exactly one target"),
        ({"url": "http://h:1"}, "--rate R"),
        ({"url": "http://h:1", "rate": 1.0, "concurrency": 2}, "--rate R"),
        ({"url": "http://h:1", "rate": -1.0}, "--rate must be positive"),
        ({"url": "http://h:1", "rate": 0.0}, "--rate must be positive"),
        ({"url": "http://h:1", "concurrency": 0}, "--concurrency must be at least 1"),
        ({"url": "h:1", "rate": 1.0}, "must start with http://"),
        ({"grpc": "http://h:1", "rate": 1.0}, "--grpc must be host:port"),
        ({"url": "http://h:1", "rate": 1.0, "workload": "nope"}, "unknown workload"),
        ({"url": "http://h:1", "rate": 1.0, "workload": "random", "groups": 2}, "--groups"),
        ({"url": "http://h:1", "rate": 1.0, "burstiness": 2.0}, "--arrival gamma only"),
        ({"url": "http://h:1", "concurrency": 2, "arrival": "gamma"}, "--rate only"),
        ({"url": "http://h:1", "rate": 1.0, "question_len": 0}, "--question-len"),
        ({"url": "http://h:1", "rate": 1.0, "scale": 0.0}, "--scale"),
        ({"url": "http://h:1", "rate": 1.0, "num_requests": -3}, "--num-requests"),
        ({"url": "http://h:1", "rate": 1.0, "request_timeout": 0.0}, "--request-timeout"),
        ({"url": "http://h:1", "rate": 1.0, "slo_itl_ms": -1.0}, "--slo-itl-ms"),
        (
            {"url": "http://h:1", "rate": 1.0, "workload": "random", "range_ratio": 2.0},
            "--range-ratio",
        ),
    ],
)
def test_inconsistent_options_are_refused_by_name(given: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_options(options(**given))


def test_the_config_is_written_whole() -> None:
    config = BenchConfig(target="http://h:1", api_key="secret", slo=Slo(e2e_ms=5.0))
    written = config.as_dict()
    assert written["workload"] == {"name": "shared-prefix", **vars_of(SharedPrefix())}
    assert written["arrivals"] == {
        "mode": "open", "rate": 1.0, "distribution": "poisson", "burstiness": 1.0
    }  # fmt: skip
    assert written["slo"] == {"ttft_ms": None, "itl_ms": None, "e2e_ms": 5.0}
    assert written["api_key"] == "***"
    at_once = BenchConfig(target="http://h:1", arrivals=OpenLoop(rate=float("inf")))
    assert json.loads(json.dumps(at_once.as_dict()))["arrivals"]["rate"] == "inf"


def vars_of(workload: SharedPrefix) -> dict[str, float]:
    return {
        "groups": workload.groups,
        "prompts_per_group": workload.prompts_per_group,
        "system_prompt_len": workload.system_prompt_len,
        "question_len": workload.question_len,
        "output_len": workload.output_len,
        "zipf": workload.zipf,
    }
