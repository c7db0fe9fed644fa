"""The router's command line, turned into a `RouterConfig`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from kvmesh import options
from kvmesh.rpc import ServerConfig
from kvmesh.security.roles import Role
from services.router.outliers import OutlierConfig
from services.router.policy import POLICIES, PolicyConfig

_SERVER = ServerConfig()


@dataclass(slots=True)
class RouterConfig:
    host: str = _SERVER.host
    port: int = 50051
    registry: str | None = None
    model: str = "smollm2"  # the tokenizer and chat template come from the same source
    disagg_min_tokens: int = 64  # shorter prompts are prefilled on the decode worker
    prefill_retries: int = 2
    prefill_timeout_s: float = 120.0
    max_migrations: int = 3
    default_max_tokens: int = 256
    load_interval_ms: int = 100
    metrics_port: int | None = 0
    grace_s: float = _SERVER.grace_s
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    approx_ttl_s: float = 120.0  # how long a routed prefix counts for an approximate worker
    pending_ttl_s: float = 10.0  # and for an exact one, until its KV events say so
    kv_stall_s: float = 5.0  # a KV event stream silent this long is considered stalled
    only_workers: tuple[str, ...] = ()  # route only to these worker ids (empty: all)
    saturation_in_flight: int = 0  # spill callers are refused at this many per decode worker
    wake_timeout_s: float = 120.0  # how long a request waits for a decode worker to appear
    max_in_flight: int = 512  # requests running at once; more wait in the queue (0: no limit)
    max_queue: int = 1024  # requests waiting for a slot; past it, RESOURCE_EXHAUSTED at once
    kv_datacenter: str | None = None  # where shared KV keys (wake) go; None: the agent's own
    outliers: OutlierConfig = field(default_factory=OutlierConfig)  # ejection (outliers.py)
    retry_budget_share: float = 0.2  # retries in flight at most this share of requests
    retry_budget_min: int = 3  # but always this many


_DEFAULTS = RouterConfig()


def parse(argv: list[str] | None = None) -> tuple[RouterConfig, str]:
    """The config and the log level."""
    parser = argparse.ArgumentParser(prog="python -m services.router")
    options.add_server_options(parser, port=_DEFAULTS.port, grace_s=_DEFAULTS.grace_s)
    options.add_registry_options(parser)
    options.add_metrics_options(parser)
    options.add_logging_options(parser)
    parser.add_argument("--model", default=_DEFAULTS.model)
    parser.add_argument(
        "--disagg-min-tokens",
        type=int,
        default=_DEFAULTS.disagg_min_tokens,
        help="prompts shorter than this are prefilled on the decode worker",
    )
    parser.add_argument("--prefill-retries", type=int, default=_DEFAULTS.prefill_retries)
    parser.add_argument("--max-migrations", type=int, default=_DEFAULTS.max_migrations)
    parser.add_argument("--default-max-tokens", type=int, default=_DEFAULTS.default_max_tokens)
    parser.add_argument("--load-interval-ms", type=int, default=_DEFAULTS.load_interval_ms)
    parser.add_argument(
        "--only-workers",
        default="",
        help="comma-separated worker ids: route only to these (default: every worker)",
    )
    ejection = parser.add_argument_group("outlier ejection and the retry budget")
    outliers = OutlierConfig()
    ejection.add_argument(
        "--outlier-consecutive-failures",
        type=int,
        default=outliers.consecutive_failures,
        help="eject a worker after this many failed calls in a row",
    )
    ejection.add_argument(
        "--outlier-base-ejection-s",
        type=float,
        default=outliers.base_ejection_s,
        help="the first ejection's length; each repeat doubles it",
    )
    ejection.add_argument(
        "--outlier-max-ejected-share",
        type=float,
        default=outliers.max_ejected_share,
        help="at most this share of a tier ejected at once (always one may be)",
    )
    ejection.add_argument(
        "--retry-budget-share",
        type=float,
        default=_DEFAULTS.retry_budget_share,
        help="retries in flight at most this share of the requests in flight",
    )
    ejection.add_argument(
        "--retry-budget-min",
        type=int,
        default=_DEFAULTS.retry_budget_min,
        help="retries always allowed in flight, whatever the share",
    )
    admission = parser.add_argument_group("admission (shedding, wake on request)")
    admission.add_argument(
        "--saturation-in-flight",
        type=int,
        default=_DEFAULTS.saturation_in_flight,
        help="refuse callers that can spill elsewhere (x-kvmesh-spill) with RESOURCE_EXHAUSTED "
        "once this router's requests in flight per decode worker reach this; 0: never",
    )
    admission.add_argument(
        "--max-in-flight",
        type=int,
        default=_DEFAULTS.max_in_flight,
        help="requests this router runs at once; the next ones wait in a queue (0: no limit)",
    )
    admission.add_argument(
        "--max-queue",
        type=int,
        default=_DEFAULTS.max_queue,
        help="requests that may wait for a slot; past it, RESOURCE_EXHAUSTED at once (the edge "
        "answers 429)",
    )
    admission.add_argument(
        "--wake-timeout-s",
        type=float,
        default=_DEFAULTS.wake_timeout_s,
        help="with no decode worker, a request waits this long for one (writing the wake key "
        "the autoscaler reads), then fails UNAVAILABLE",
    )
    admission.add_argument(
        "--kv-datacenter",
        default=_DEFAULTS.kv_datacenter,
        help="the datacenter whose KV holds the mesh's shared keys (the wake key); "
        "default: the registry agent's own",
    )
    routing = parser.add_argument_group("routing (docs/architecture.md: cache-aware routing)")
    policy = _DEFAULTS.policy
    routing.add_argument("--policy", choices=POLICIES, default=policy.policy)
    routing.add_argument(
        "--overlap-weight",
        type=float,
        default=policy.overlap_weight,
        help="cost per prompt token a worker would compute, against one token of its load",
    )
    routing.add_argument(
        "--balance-slack",
        type=float,
        default=policy.balance_slack,
        help="bounded load: a worker takes requests while in flight <= (1+slack) x mean",
    )
    routing.add_argument(
        "--balance-abs",
        type=int,
        default=policy.balance_abs,
        help="bounded load: or while in flight <= the least loaded worker's + this",
    )
    routing.add_argument(
        "--decode-request-tokens",
        type=int,
        default=policy.decode_request_tokens,
        help="load of one running decode request, in prompt tokens",
    )
    routing.add_argument(
        "--approx-ttl-s",
        type=float,
        default=_DEFAULTS.approx_ttl_s,
        help="a worker without trusted KV events is assumed to hold what it was sent this long",
    )
    routing.add_argument(
        "--pending-ttl-s",
        type=float,
        default=_DEFAULTS.pending_ttl_s,
        help="a worker is assumed to hold a prompt just sent to it this long (until its events)",
    )
    routing.add_argument("--kv-stall-s", type=float, default=_DEFAULTS.kv_stall_s)
    routing.add_argument("--seed", type=int, default=policy.seed, help="the random policy's seed")
    args = parser.parse_args(argv)
    options.configure_security(args, Role.ROUTER)
    config = RouterConfig(
        host=args.host,
        port=args.port,
        registry=args.registry,
        model=args.model,
        disagg_min_tokens=args.disagg_min_tokens,
        prefill_retries=args.prefill_retries,
        max_migrations=args.max_migrations,
        default_max_tokens=args.default_max_tokens,
        load_interval_ms=args.load_interval_ms,
        metrics_port=options.metrics_port(args),
        grace_s=args.grace_s,
        policy=PolicyConfig(
            policy=args.policy,
            overlap_weight=args.overlap_weight,
            balance_slack=args.balance_slack,
            balance_abs=args.balance_abs,
            decode_request_tokens=args.decode_request_tokens,
            seed=args.seed,
        ),
        approx_ttl_s=args.approx_ttl_s,
        pending_ttl_s=args.pending_ttl_s,
        kv_stall_s=args.kv_stall_s,
        only_workers=tuple(w for w in args.only_workers.split(",") if w),
        saturation_in_flight=args.saturation_in_flight,
        wake_timeout_s=args.wake_timeout_s,
        max_in_flight=args.max_in_flight,
        max_queue=args.max_queue,
        kv_datacenter=args.kv_datacenter,
        outliers=OutlierConfig(
            consecutive_failures=args.outlier_consecutive_failures,
            base_ejection_s=args.outlier_base_ejection_s,
            max_ejected_share=args.outlier_max_ejected_share,
        ),
        retry_budget_share=args.retry_budget_share,
        retry_budget_min=args.retry_budget_min,
    )
    if config.max_in_flight < 0 or config.max_queue < 0:
        parser.error("--max-in-flight and --max-queue must not be negative")
    if config.saturation_in_flight < 0:
        parser.error("--saturation-in-flight must not be negative")
    if config.wake_timeout_s < 0:
        parser.error("--wake-timeout-s must not be negative")
    return config, args.log_level
