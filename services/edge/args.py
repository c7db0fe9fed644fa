"""Command line -> `EdgeConfig`, the only settings the edge reads.

The edge fronts one or more clusters, each a router's gRPC address under a name: `--router ADDR`
is one cluster named "default"; `--cluster NAME=HOST:PORT`, repeated, names several (the name is
the cluster's Consul datacenter, which cordon keys use). Requests go to `--home` first.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmesh import options
from kvmesh.security.roles import Role

ROUTER_ENV = "KVMESH_ROUTER"
REGISTRY_ENV = "CONSUL_HTTP_ADDR"
DEFAULT_ROUTER = "127.0.0.1:50051"
DEFAULT_CLUSTER = "default"  # the one cluster of `--router`

_CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d{1,5})")


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the "edge listening on" line says which)
    # (name, router gRPC address host:port) per cluster, in the order they are tried after home
    clusters: tuple[tuple[str, str], ...] = ((DEFAULT_CLUSTER, DEFAULT_ROUTER),)
    home: str = ""  # the cluster tried first; "": the first of `clusters`
    registry: str | None = None  # Consul / embedded registry to watch for cordons; None: none
    request_timeout_s: float = 600.0  # gRPC deadline of one generation, streaming included
    probe_timeout_s: float = 2.0  # deadline of /health and /v1/models calls to the router
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413
    default_max_tokens: int | None = None  # when a request sets none; None: the router's default
    shutdown_grace_s: float = 5.0  # on SIGTERM, in-flight responses get this long, then cancel
    log_level: str = options.DEFAULT_LOG_LEVEL
    log_json: bool | None = None  # None: JSON unless stderr is a terminal
    api_key_file: Path | None = None  # `KEY TENANT [rps=N] [tpm=N]` lines; None: no keys needed
    rate_limit_rps: float | None = None  # every key's requests per second, unless its line says
    rate_limit_tpm: float | None = None  # every key's tokens per minute, unless its line says
    tls_cert: Path | None = None  # HTTPS with this certificate (PEM) and key; None: plain HTTP
    tls_key: Path | None = None
    max_connections: int | None = 1024  # concurrent connections; past it, 503 (None: no limit)
    body_timeout_s: float = 30.0  # a request body must arrive within this long (else 408)
    header_timeout_s: float = 10.0  # and a request's headers within this long (else 408)
    # Find each cluster's routers through `registry` (the passing `kvmesh-router` instances of
    # its datacenter); the addresses given are used until discovery answers
    discover_routers: bool = False

    def __post_init__(self) -> None:
        if not self.clusters:
            raise ValueError("at least one cluster is required")
        names = [name for name, _ in self.clusters]
        for name, address in self.clusters:
            check_cluster_name(name)
            if not address:
                raise ValueError(f"cluster {name!r} has no router address")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"cluster names must be unique; repeated: {', '.join(duplicates)}")
        if not self.home:
            object.__setattr__(self, "home", names[0])  # frozen: set once, here
        elif self.home not in names:
            raise ValueError(
                f"home cluster {self.home!r} is not one of the clusters ({', '.join(names)})"
            )
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
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("HTTPS needs both a certificate and its key (--tls-cert, --tls-key)")
        for name in ("rate_limit_rps", "rate_limit_tpm", "body_timeout_s", "header_timeout_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.discover_routers and self.registry is None:
            raise ValueError("discovering routers needs a registry (--registry)")

    @property
    def router(self) -> str:
        """The home cluster's router address(es)."""
        return dict(self.clusters)[self.home]


def router_addresses(value: str) -> list[str]:
    """`A,B` -> ["A", "B"]: a cluster's routers."""
    return [a.strip() for a in value.split(",") if a.strip()]


def check_cluster_name(name: str) -> None:
    if not _CLUSTER_NAME.fullmatch(name):
        raise ValueError(
            f"cluster name {name!r} must be 1 to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


def check_cluster(name: str, address: str) -> None:
    """Raise ValueError, saying what is wrong, for a bad cluster name or HOST:PORT address."""
    check_cluster_name(name)
    for one in router_addresses(address) or [address]:
        match = _ADDRESS.fullmatch(one)
        if match is None or not 0 < int(match[2]) <= 65535:
            raise ValueError(f"cluster {name!r}: router address {one!r} is not HOST:PORT")


def _cluster_arg(value: str) -> tuple[str, str]:
    """`NAME=HOST:PORT` -> (name, address), for argparse."""
    name, sep, address = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=HOST:PORT")
    try:
        check_cluster(name, address)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return name, address


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    defaults = EdgeConfig()
    parser = argparse.ArgumentParser(
        prog="python -m services.edge",
        description="kvmesh edge: an OpenAI-compatible HTTP/SSE front door to the router.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default=defaults.host, help="address to listen on")
    parser.add_argument("--port", type=int, default=defaults.port, help="0: any free port")
    targets = parser.add_mutually_exclusive_group()
    targets.add_argument(
        "--router",
        default=env.get(ROUTER_ENV) or DEFAULT_ROUTER,
        help=f"the router's gRPC address, or several, comma-separated: one cluster, named "
        f"{DEFAULT_CLUSTER!r} (env {ROUTER_ENV})",
    )
    targets.add_argument(
        "--cluster",
        dest="clusters",
        action="append",
        type=_cluster_arg,
        default=None,
        metavar="NAME=HOST:PORT[,HOST:PORT...]",
        help="a cluster (its Consul datacenter's name) and its routers' gRPC addresses; repeat "
        "for several: requests go to --home first, then to the others in this order",
    )
    parser.add_argument(
        "--home",
        default=None,
        help="the cluster tried first (default: the first --cluster)",
    )
    parser.add_argument(
        "--registry",
        default=env.get(REGISTRY_ENV) or None,
        help="Consul / embedded registry HOST:PORT to watch for cordoned clusters, which get "
        f"no new requests (env {REGISTRY_ENV}; default: none)",
    )
    parser.add_argument(
        "--discover-routers",
        action="store_true",
        help="find each cluster's routers in --registry (passing kvmesh-router instances of "
        "its datacenter), balance over them and fail over among them",
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
    parser.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help="require API keys: lines of 'KEY TENANT [rps=N] [tpm=N]' (default: none needed)",
    )
    parser.add_argument(
        "--rate-limit-rps", type=float, default=None, help="each key's requests per second"
    )
    parser.add_argument(
        "--rate-limit-tpm", type=float, default=None, help="each key's tokens per minute"
    )
    parser.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS with this PEM")
    parser.add_argument("--tls-key", type=Path, default=None, help="the certificate's key")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        help="concurrent connections; past it, 503",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=defaults.body_timeout_s,
        help="seconds a request body may take to arrive (else 408)",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=defaults.header_timeout_s,
        help="seconds a request's headers may take to arrive (else 408 and the connection closes)",
    )
    options.add_logging_options(parser)
    options.add_tls_options(parser)
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
    options.configure_tls(args, Role.EDGE)  # its channels to the routers
    clusters = tuple(args.clusters or [(DEFAULT_CLUSTER, args.router)])
    try:
        return EdgeConfig(
            host=args.host,
            port=args.port,
            clusters=clusters,
            home=args.home or "",
            registry=args.registry,
            request_timeout_s=args.request_timeout,
            probe_timeout_s=args.probe_timeout,
            max_body_bytes=args.max_body_bytes,
            default_max_tokens=args.default_max_tokens,
            shutdown_grace_s=args.shutdown_grace,
            log_level=args.log_level,
            log_json=args.log_json,
            api_key_file=args.api_key_file,
            rate_limit_rps=args.rate_limit_rps,
            rate_limit_tpm=args.rate_limit_tpm,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            max_connections=args.max_connections,
            body_timeout_s=args.body_timeout,
            header_timeout_s=args.header_timeout,
            discover_routers=args.discover_routers,
        )
    except ValueError as e:
        parser.error(str(e))  # exits with status 2 and the usage line
