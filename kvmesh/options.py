"""Command-line option groups every service shares: server, registry, metrics, logging, engine.

Each default is written once, in the config dataclass the options fill (`ServerConfig`,
`EngineConfig`, ...); a service adds the groups it needs and only its own options by hand.
Ports differ by service, so each passes its own default port.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from kvmesh.errors import KvmeshError
from kvmesh.rpc.server import ServerConfig
from kvmesh.security.roles import Role

if TYPE_CHECKING:  # the engine's settings load only where engine options are added
    from kvmesh.engine.config import EngineConfig

DEFAULT_LOG_LEVEL = "INFO"
NO_METRICS = -1

_SERVER: dict[str, Any] = {f.name: f.default for f in fields(ServerConfig)}


def add_server_options(
    parser: argparse.ArgumentParser, *, port: int, grace_s: float | None = None
) -> None:
    """`--host`, `--port` (the service's own default), `--grace-s` (ServerConfig's unless the
    service passes its own)."""
    group = parser.add_argument_group("server")
    group.add_argument("--host", default=_SERVER["host"], help="address to listen on")
    group.add_argument("--port", type=int, default=port, help="0: any free port")
    group.add_argument(
        "--grace-s",
        type=float,
        default=_SERVER["grace_s"] if grace_s is None else grace_s,
        help="how long in-flight calls get on stop",
    )
    add_tls_options(parser)


def add_tls_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-dir",
        default=None,
        help="mutual TLS with this `kvmesh certs init` directory's certificates "
        "(default: $KVMESH_TLS_DIR; neither: plaintext)",
    )


def configure_security(args: argparse.Namespace, role: Role) -> None:
    """What a service sets for the whole process as its options are parsed: its TLS identity
    (`configure_tls`) and its registry token (`use_registry_token`)."""
    configure_tls(args, role)
    use_registry_token(args)


def configure_tls(args: argparse.Namespace, role: Role) -> None:
    """Set the process's TLS identity from `--tls-dir` (or $KVMESH_TLS_DIR): every gRPC server
    and channel it opens then uses mutual TLS as `role`."""
    from kvmesh.security import tls

    try:
        tls.configure(args.tls_dir, role)
    except KvmeshError as e:
        raise SystemExit(f"--tls-dir: {e}") from None


def add_registry_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("registry")
    group.add_argument(
        "--registry",
        default=os.environ.get("CONSUL_HTTP_ADDR"),
        help="Consul / embedded registry address (default: $CONSUL_HTTP_ADDR)",
    )
    group.add_argument(
        "--registry-token-file",
        default=None,
        help="the registry's ACL token, from this file (default: $CONSUL_HTTP_TOKEN, "
        "$CONSUL_HTTP_TOKEN_FILE)",
    )


def use_registry_token(args: argparse.Namespace) -> None:
    """`--registry-token-file` for every registry client of this process, as Consul's
    CONSUL_HTTP_TOKEN_FILE (`kvmesh.discovery.client.token_from_environment`)."""
    path = getattr(args, "registry_token_file", None)
    if path:
        os.environ["CONSUL_HTTP_TOKEN_FILE"] = path


def add_metrics_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metrics")
    group.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help=f"Prometheus /metrics port; 0: any free port, {NO_METRICS}: no endpoint",
    )


def metrics_port(args: argparse.Namespace) -> int | None:
    """The metrics port to serve, or None for no endpoint."""
    port: int = args.metrics_port
    return None if port == NO_METRICS else port


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default=DEFAULT_LOG_LEVEL, help="a logging level name")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    from kvmesh.engine.config import (
        ATTENTION_BACKENDS,
        DTYPES,
        KV_DTYPES,
        SPECULATION_METHODS,
        EngineConfig,
    )

    engine: dict[str, Any] = {f.name: f.default for f in fields(EngineConfig)}
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--engine",
        default=engine["engine"],
        help="torch, sim, or a plug-in from the kvmesh.engines entry points",
    )
    group.add_argument(
        "--model",
        default=engine["model"],
        help="smollm2, a Hugging Face directory, a .gguf file, or dummy:<preset>",
    )
    group.add_argument("--device", default=engine["device"], help="auto, cpu, cuda, cuda:N")
    group.add_argument("--dtype", default=engine["dtype"], choices=DTYPES)
    group.add_argument(
        "--kv-dtype",
        default=engine["kv_dtype"],
        choices=KV_DTYPES,
        help="the KV cache's dtype (auto: the model's); fp8_e4m3 keeps per-block scales",
    )
    group.add_argument(
        "--transfer-dtype",
        default=engine["transfer_dtype"],
        choices=KV_DTYPES,
        help="the dtype exported KV is sent in (auto: the cache's); decode converts on import",
    )
    group.add_argument("--block-size", type=int, default=engine["block_size"])
    group.add_argument("--num-blocks", type=int, default=engine["num_blocks"])
    group.add_argument("--max-num-seqs", type=int, default=engine["max_num_seqs"])
    group.add_argument(
        "--max-num-waiting",
        type=int,
        default=engine["max_num_waiting"],
        help="requests waiting to be scheduled; past it, new ones get RESOURCE_EXHAUSTED",
    )
    group.add_argument("--max-batched-tokens", type=int, default=engine["max_num_batched_tokens"])
    group.add_argument("--max-model-len", type=int, default=engine["max_model_len"])
    group.add_argument(
        "--attention-backend",
        default=engine["attention_backend"],
        choices=ATTENTION_BACKENDS,
        help="auto: triton on CUDA, sdpa on CPU",
    )
    group.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=engine["cuda_graphs"],
        help="capture decode steps as CUDA graphs (CUDA, triton backend)",
    )
    group.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=engine["async_scheduling"],
        help="schedule each step while the previous one runs (default: on a GPU)",
    )
    group.add_argument(
        "--torch-threads", type=int, default=engine["num_threads"], help="0: PyTorch's default"
    )
    group.add_argument(
        "--speculate",
        default=engine["speculate"],
        choices=SPECULATION_METHODS,
        help="speculative decoding (default: off); ngram: drafts by prompt lookup",
    )
    group.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=engine["num_speculative_tokens"],
        help="draft tokens per decoding sequence and step, at most",
    )
    group.add_argument(
        "--ngram-max",
        type=int,
        default=engine["ngram_max"],
        help="longest suffix looked up for an n-gram draft",
    )
    group.add_argument(
        "--ngram-min",
        type=int,
        default=engine["ngram_min"],
        help="shortest suffix looked up for an n-gram draft",
    )
    group.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an engine-specific setting (repeatable), e.g. the sim engine's gpu=H100",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    from kvmesh.engine.config import EngineConfig

    options: dict[str, str] = {}
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--engine-arg takes KEY=VALUE, got {item!r}")
        options[key] = value
    return EngineConfig(
        engine=args.engine,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        kv_dtype=args.kv_dtype,
        transfer_dtype=args.transfer_dtype,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_waiting=args.max_num_waiting,
        max_num_batched_tokens=args.max_batched_tokens,
        max_model_len=args.max_model_len,
        attention_backend=args.attention_backend,
        cuda_graphs=args.cuda_graphs,
        async_scheduling=args.async_scheduling,
        num_threads=args.torch_threads,
        speculate=args.speculate,
        num_speculative_tokens=args.num_speculative_tokens,
        ngram_max=args.ngram_max,
        ngram_min=args.ngram_min,
        options=options,
    )
