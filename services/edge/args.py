"""Command line -> `EdgeConfig`, the only settings the edge reads."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ROUTER_ENV = "KVMESH_ROUTER"
DEFAULT_ROUTER = "127.0.0.1:50051"


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the "edge listening on" line says which)
    router: str = DEFAULT_ROUTER  # the router's gRPC address, host:port
    request_timeout_s: float = 600.0  # gRPC deadline of one generation, streaming included
    probe_timeout_s: float = 2.0  # deadline of /health and /v1/models calls to the router
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413
    default_max_tokens: int | None = None  # when a request sets none; None: the router's default
    shutdown_grace_s: float = 5.0  # on SIGTERM, in-flight responses get this long, then cancel
    log_level: str = "INFO"
    log_json: bool | None = None  # None: JSON unless stderr is a terminal

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.request_timeout_s <= 0 or self.probe_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be at least 1")
        if self.shutdown_grace_s < 0:
            raise ValueError("shutdown_grace_s must not be negative")


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    defaults = EdgeConfig()
    parser = argparse.ArgumentParser(
        prog="python -m services.edge",
        description="kvmesh edge: an OpenAI-compatible HTTP/SSE front door to the router.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default=defaults.host, help="address to listen on")
    parser.add_argument("--port", type=int, default=defaults.port, help="0: any free port")
    parser.add_argument(
        "--router",
        default=env.get(ROUTER_ENV) or DEFAULT_ROUTER,
        help=f"the router's gRPC address (env {ROUTER_ENV})",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=defaults.request_timeout_s,
        help="seconds one generation may take, streaming included",
    )
    parser.add_argument(
        "--probe-timeout",
        type=float,
        default=defaults.probe_timeout_s,
        help="seconds for the router calls behind /health and /v1/models",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults.max_body_bytes,
        help="larger request bodies are refused with 413",
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=None,
        help="max_tokens for requests that set none; None: the router's default",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=defaults.shutdown_grace_s,
        help="seconds in-flight responses get on SIGTERM before they are cancelled",
    )
    parser.add_argument("--log-level", default=defaults.log_level, help="a logging level name")
    parser.add_argument(
        "--log-json",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="JSON logs; None: JSON unless stderr is a terminal",
    )
    return parser


def parse_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> EdgeConfig:
    parser = build_parser(os.environ if env is None else env)
    args = parser.parse_args(argv)
    try:
        return EdgeConfig(
            host=args.host,
            port=args.port,
            router=args.router,
            request_timeout_s=args.request_timeout,
            probe_timeout_s=args.probe_timeout,
            max_body_bytes=args.max_body_bytes,
            default_max_tokens=args.default_max_tokens,
            shutdown_grace_s=args.shutdown_grace,
            log_level=args.log_level,
            log_json=args.log_json,
        )
    except ValueError as e:
        parser.error(str(e))  # exits with status 2 and the usage line
