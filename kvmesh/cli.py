"""The `kvmesh` command."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from kvmesh.engine.config import ATTENTION_BACKENDS, DTYPES, SPECULATION_METHODS, EngineConfig
from kvmesh.errors import KvmeshError
from kvmesh.security.roles import Role
from kvmesh.telemetry import configure_logging

if TYPE_CHECKING:
    from kvmesh.security.tls import TlsIdentity

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


_ENGINE_DEFAULTS = EngineConfig()


def engine_options(fn: F) -> F:
    """The options every command that runs an engine takes, turned into an EngineConfig
    (defaults from EngineConfig: written once)."""
    d = _ENGINE_DEFAULTS
    options = [
        click.option(
            "--model",
            default=d.model,
            show_default=True,
            help="smollm2, a Hugging Face directory, a .gguf file, or dummy:<preset>",
        ),
        click.option(
            "--device", default=d.device, show_default=True, help="auto, cpu, cuda, cuda:N"
        ),
        click.option(
            "--dtype",
            default=d.dtype,
            show_default=True,
            type=click.Choice(DTYPES),
            help="auto: float32 on CPU, bfloat16 on CUDA",
        ),
        click.option(
            "--block-size", default=d.block_size, show_default=True, help="tokens per KV block"
        ),
        click.option(
            "--num-blocks", type=int, default=d.num_blocks, help="KV blocks (default: by memory)"
        ),
        click.option("--max-num-seqs", default=d.max_num_seqs, show_default=True),
        click.option(
            "--max-batched-tokens",
            default=d.max_num_batched_tokens,
            show_default=True,
            help="tokens per step; longer prompts are prefilled in chunks",
        ),
        click.option("--max-model-len", type=int, default=d.max_model_len, help="context limit"),
        click.option(
            "--attention-backend",
            default=d.attention_backend,
            show_default=True,
            type=click.Choice(ATTENTION_BACKENDS),
            help="auto: triton on CUDA, sdpa on CPU",
        ),
        click.option(
            "--cuda-graphs/--no-cuda-graphs",
            default=d.cuda_graphs,
            show_default=True,
            help="capture decode steps as CUDA graphs (CUDA, triton backend)",
        ),
        click.option(
            "--async-scheduling/--no-async-scheduling",
            default=d.async_scheduling,
            help="schedule each step while the previous one runs (default: on a GPU)",
        ),
        click.option(
            "--speculate",
            default=d.speculate,
            type=click.Choice(SPECULATION_METHODS),
            help="speculative decoding (default: off); ngram: drafts by prompt lookup",
        ),
        click.option(
            "--num-speculative-tokens",
            default=d.num_speculative_tokens,
            show_default=True,
            help="draft tokens per decoding sequence and step, at most",
        ),
        click.option("--ngram-max", default=d.ngram_max, show_default=True),
        click.option("--ngram-min", default=d.ngram_min, show_default=True),
    ]

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        config = EngineConfig(
            model=kwargs.pop("model"),
            device=kwargs.pop("device"),
            dtype=kwargs.pop("dtype"),
            block_size=kwargs.pop("block_size"),
            num_blocks=kwargs.pop("num_blocks"),
            max_num_seqs=kwargs.pop("max_num_seqs"),
            max_num_batched_tokens=kwargs.pop("max_batched_tokens"),
            max_model_len=kwargs.pop("max_model_len"),
            attention_backend=kwargs.pop("attention_backend"),
            cuda_graphs=kwargs.pop("cuda_graphs"),
            async_scheduling=kwargs.pop("async_scheduling"),
            speculate=kwargs.pop("speculate"),
            num_speculative_tokens=kwargs.pop("num_speculative_tokens"),
            ngram_max=kwargs.pop("ngram_max"),
            ngram_min=kwargs.pop("ngram_min"),
        )
        try:
            return fn(config=config, **kwargs)
        except KvmeshError as e:
            raise click.ClickException(str(e)) from e

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


@click.group()
@click.option("--log-level", default="WARNING", show_default=True)
@click.option("--log-json/--no-log-json", default=None, help="default: JSON unless a terminal")
def main(log_level: str, log_json: bool | None) -> None:
    """kvmesh: disaggregated LLM serving."""
    configure_logging(log_level, json=log_json)


@main.command()
@click.option("--model", default="smollm2", show_default=True)
def prepare(model: str) -> None:
    """Fetch and convert a model once, so later starts take seconds."""
    from kvmesh import models

    try:
        source = models.resolve(model)
    except KvmeshError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{model}: ready ({source.weights_dir or source.model_id})")


@main.command()
@engine_options
@click.option("--prompt", "-p", default=None, help="ask one question and exit")
@click.option("--system", default=None, help="a system message")
@click.option("--max-tokens", default=256, show_default=True)
@click.option("--temperature", default=0.7, show_default=True)
@click.option("--top-p", default=0.9, show_default=True)
@click.option("--top-k", default=0, show_default=True)
@click.option("--seed", type=int, default=None)
def chat(config: EngineConfig, prompt: str | None, system: str | None, **sampling: Any) -> None:
    """Chat with the model through the engine, streaming tokens."""
    from kvmesh.chat import run_chat

    asyncio.run(run_chat(config, prompt=prompt, system=system, **sampling))


@main.command("check-accuracy")
@engine_options
@click.option("--greedy-tokens", default=32, show_default=True)
@click.option(
    "--fp32-reference/--no-fp32-reference",
    default=False,
    help="also measure both against a float32 run of the same weights",
)
@click.option("--num-prompts", default=20, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def check_accuracy(
    config: EngineConfig,
    greedy_tokens: int,
    fp32_reference: bool,
    num_prompts: int,
    json_out: Path | None,
) -> None:
    """Compare the engine with transformers on the same weights (greedy tokens, logits)."""
    from kvmesh.bench.accuracy import check_accuracy as run_check
    from kvmesh.bench.prompts import chat_prompt_ids
    from kvmesh.engine.torch_engine import TorchCore

    core = TorchCore(config)
    report = run_check(
        core,
        chat_prompt_ids(core, num_prompts),
        greedy_tokens=greedy_tokens,
        fp32_reference=fp32_reference,
    )
    _emit(report.as_dict(), json_out)


@main.command("bench-engine")
@engine_options
@click.option("--concurrency", default=16, show_default=True, help="CPU: concurrent requests")
@click.option("--max-tokens", default=64, show_default=True, help="CPU: tokens per request")
@click.option("--rounds", default=3, show_default=True, help="CPU: alternating rounds (medians)")
@click.option("--gpu", is_flag=True, help="prefill and decode against rooflines instead")
@click.option("--prefill-tokens", default=2048, show_default=True, help="GPU: prompt length")
@click.option(
    "--cached-tokens", default=1536, show_default=True, help="GPU: prefix-hit prompt's cached part"
)
@click.option("--batches", default="1,32,64", show_default=True, help="GPU: decode batch sizes")
@click.option("--context", default=512, show_default=True, help="GPU: decode context length")
@click.option("--long-context", default=4096, show_default=True, help="GPU: long decode context")
@click.option("--long-batch", default=32, show_default=True, help="GPU: its batch (0: skip)")
@click.option("--steps", default=32, show_default=True, help="GPU: timed decode steps")
@click.option(
    "--transformers-batch",
    default=32,
    show_default=True,
    help="GPU: transformers' generate at this batch, side by side (0: skip)",
)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def bench_engine(
    config: EngineConfig,
    concurrency: int,
    max_tokens: int,
    rounds: int,
    gpu: bool,
    prefill_tokens: int,
    cached_tokens: int,
    batches: str,
    context: int,
    long_context: int,
    long_batch: int,
    steps: int,
    transformers_batch: int,
    json_out: Path | None,
) -> None:
    """Engine speed: against transformers on CPU, or against rooflines on a GPU (--gpu)."""
    from kvmesh.bench import engine as bench
    from kvmesh.bench.prompts import chat_prompt_ids

    if gpu:
        import torch

        from kvmesh.engine.torch_engine import TorchCore

        config.max_num_batched_tokens = max(config.max_num_batched_tokens, prefill_tokens)
        sizes = [int(b) for b in batches.split(",")]
        config.max_num_seqs = max(config.max_num_seqs, *sizes, long_batch, transformers_batch)
        shape: dict[str, Any] = {
            "prefill_tokens": prefill_tokens,
            "batches": sizes,
            "context": context,
            "long_context": long_context,
            "long_batch": long_batch,
            "steps": steps,
        }
        if config.num_blocks is None:
            config.num_blocks = bench.gpu_blocks_needed(block_size=config.block_size, **shape)
        core = TorchCore(config)
        core.warm_up()
        name = torch.cuda.get_device_name(core.model.device) if torch.cuda.is_available() else ""
        report = bench.gpu_report(
            core,
            cached_tokens=cached_tokens,
            transformers_batch=transformers_batch,
            peaks=bench.gpu_peaks(name),
            **shape,
        )
        _emit(report, json_out)
        return
    from kvmesh.engine.torch_engine import TorchEngine

    engine = TorchEngine(config)
    prompts = chat_prompt_ids(engine.core, concurrency)
    result = bench.compare_with_transformers(engine, prompts, max_tokens, rounds=rounds)
    _emit(result.as_dict(), json_out)


@main.command("bench-speculation")
@engine_options
@click.option("--batches", default="1,16", show_default=True, help="batch sizes to run")
@click.option(
    "--single-stream-prompts",
    default=4,
    show_default=True,
    help="batch 1: prompts run one after another",
)
@click.option("--max-tokens", default=128, show_default=True, help="tokens per request at most")
@click.option(
    "--prompts",
    "prompt_kind",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "text", "workload"]),
    help="text: a Python file to edit (needs a chat template); workload: the code-edit "
    "workload's token ids; auto: text where the model has a chat template",
)
@click.option("--functions", default=6, show_default=True, help="text: functions in each file")
@click.option("--prompt-len", default=1024, show_default=True, help="workload: prompt tokens")
@click.option("--rounds", default=1, show_default=True, help="runs per mode (medians)")
@click.option("--seed", default=0, show_default=True, help="prompts' seed")
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def bench_speculation(
    config: EngineConfig,
    batches: str,
    single_stream_prompts: int,
    max_tokens: int,
    prompt_kind: str,
    functions: int,
    prompt_len: int,
    rounds: int,
    seed: int,
    json_out: Path | None,
) -> None:
    """N-gram speculative decoding against plain decoding (and an oracle's drafts, the upper
    bound) at batch 1 and 16, one engine, one run: acceptance, tokens per step, tokens/s."""
    from kvmesh.bench import speculation as bench
    from kvmesh.engine.torch_engine import TorchCore

    sizes = [int(b) for b in batches.split(",")]
    config.speculate = "ngram"
    config.async_scheduling = None  # the baseline_async mode turns it on where it pays
    config.enable_prefix_cache = False  # every mode computes its prompts
    config.max_num_seqs = max(config.max_num_seqs, *sizes)
    core = TorchCore(config)
    core.warm_up()
    tokenizer = core.tokenizer
    if prompt_kind == "auto":
        has_template = tokenizer is not None and tokenizer.has_chat_template
        prompt_kind = "text" if has_template else "workload"
    count = max(max(sizes), single_stream_prompts)
    if prompt_kind == "text":
        prompts = bench.text_prompts(core, count, functions, seed)
    else:
        prompts = bench.workload_prompts(core, count, prompt_len, seed)
    report = bench.speculation_report(
        core,
        prompts,
        prompt_kind=prompt_kind,
        batches=sizes,
        single_stream_prompts=single_stream_prompts,
        max_tokens=max_tokens,
        rounds=rounds,
    )
    _emit(report, json_out)


@main.command()
@click.option("--model", default="smollm2", show_default=True)
@click.option("--prefill", "num_prefill", default=1, show_default=True, help="prefill workers")
@click.option("--decode", "num_decode", default=1, show_default=True, help="decode workers")
@click.option("--edge-port", default=8000, show_default=True)
@click.option("--router-port", default=50051, show_default=True)
@click.option("--registry-port", default=8500, show_default=True)
@click.option(
    "--device", default="auto", show_default=True, help="cpu, cuda (workers spread over GPUs)"
)
@click.option(
    "--disagg-min-tokens",
    default=64,
    show_default=True,
    help="prompts shorter than this are prefilled on the decode worker",
)
@click.option(
    "--log-dir", type=click.Path(path_type=Path), default=Path(".kvmesh/logs"), show_default=True
)
@click.option(
    "--clusters",
    default="",
    help="comma-separated cluster names, e.g. us-east,eu-west: a datacenter, workers and a "
    "router each, one edge in front (default: one cluster)",
)
@click.option(
    "--autoscale/--no-autoscale",
    default=False,
    show_default=True,
    help="start the autoscaler and the control plane; the control plane starts the workers",
)
@click.option("--capacity", default=4, show_default=True, help="autoscale: replicas per cluster")
@click.option(
    "--admin-token",
    envvar="KVMESH_ADMIN_TOKEN",
    default=None,
    help="admin token of the autoscaler and control plane (env KVMESH_ADMIN_TOKEN)",
)
@click.option(
    "--worker-arg",
    "worker_args",
    multiple=True,
    metavar="ARG",
    help="one more argument for every worker, one token each, repeatable: "
    "--worker-arg=--block-size --worker-arg=32",
)
@click.option(
    "--prefill-arg",
    "prefill_args",
    multiple=True,
    metavar="ARG",
    help="one more argument for the prefill workers, after --worker-arg's (so it wins); one "
    "token each, repeatable: --prefill-arg=--attention-backend --prefill-arg=sdpa",
)
@click.option(
    "--decode-arg",
    "decode_args",
    multiple=True,
    metavar="ARG",
    help="the same for the decode workers: --decode-arg=--attention-backend --decode-arg=paged",
)
@click.option(
    "--tls-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="mutual TLS between every service, with this directory's certificates (made with "
    "`kvmesh certs init` if it has none); with --secure, where its secrets go",
)
@click.option(
    "--secure",
    is_flag=True,
    help="mutual TLS, registry ACLs, the edge over HTTPS with an API key, an admin token; "
    "secrets made once in --tls-dir (default: .kvmesh/secure)",
)
@click.option(
    "--routers",
    "num_routers",
    default=1,
    show_default=True,
    help="routers per cluster: the edge finds them in the registry, balances over them and "
    "resumes a stream on another when its router dies",
)
@click.option(
    "--restart/--no-restart",
    default=True,
    show_default=True,
    help="restart a child that dies, with backoff (0.5 s doubling to 30 s), and log each restart",
)
def up(
    model: str,
    num_prefill: int,
    num_decode: int,
    edge_port: int,
    router_port: int,
    registry_port: int,
    device: str,
    disagg_min_tokens: int,
    log_dir: Path,
    clusters: str,
    autoscale: bool,
    capacity: int,
    admin_token: str | None,
    worker_args: tuple[str, ...],
    prefill_args: tuple[str, ...],
    decode_args: tuple[str, ...],
    tls_dir: Path | None,
    secure: bool,
    num_routers: int,
    restart: bool,
) -> None:
    """Start the whole mesh on this machine: registry, workers, router, HTTP edge.

    Workers take any worker option (`python -m services.prefill --help`) through --worker-arg
    (both tiers), --prefill-arg and --decode-arg, one command-line token per flag, so that the
    tiers can differ, e.g. in attention backend:

    \b
      kvmesh up --prefill-arg=--attention-backend --prefill-arg=sdpa \\
                --decode-arg=--attention-backend --decode-arg=paged

    Workers whose KV layouts differ (--block-size, --dtype) are not paired: the router serves
    their requests aggregated and logs why.
    """
    from kvmesh.up import UpConfig, run

    if num_decode < 1 or num_prefill < 0:
        raise click.BadParameter("--decode must be at least 1 and --prefill at least 0")
    if num_routers < 1:
        raise click.BadParameter("must be at least 1", param_hint="--routers")
    names = tuple(c.strip() for c in clusters.split(",") if c.strip())
    if len(set(names)) != len(names):
        raise click.BadParameter(f"cluster names repeat: {clusters}", param_hint="--clusters")
    if capacity < num_prefill + num_decode:
        raise click.BadParameter("--capacity must hold --prefill + --decode")
    if autoscale and (prefill_args or decode_args):
        raise click.BadParameter(
            "the control plane starts autoscaled workers with --worker-arg only",
            param_hint="--prefill-arg / --decode-arg",
        )
    config = UpConfig(
        clusters=names,
        autoscale=autoscale,
        capacity=capacity,
        admin_token=admin_token,
        model=model,
        num_prefill=num_prefill,
        num_decode=num_decode,
        edge_port=edge_port,
        router_port=router_port,
        registry_port=registry_port,
        device=device,
        disagg_min_tokens=disagg_min_tokens,
        log_dir=log_dir,
        extra_worker_args=list(worker_args),
        extra_prefill_args=list(prefill_args),
        extra_decode_args=list(decode_args),
        tls_dir=tls_dir,
        secure=secure,
        restart=restart,
        routers=num_routers,
    )
    try:
        asyncio.run(run(config))
    except RuntimeError as e:
        raise click.ClickException(str(e)) from e


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8500, show_default=True, help="the first datacenter's agent")
@click.option(
    "--datacenter",
    "datacenters",
    multiple=True,
    default=("dc1",),
    show_default=True,
    help="repeat for several datacenters; each gets its own agent port (port+i)",
)
@click.option(
    "--tls-dir",
    envvar="KVMESH_TLS_DIR",
    default=None,
    help="serve HTTPS with the registry certificate of this directory; gRPC health checks "
    "use it too (mutual TLS)",
)
@click.option(
    "--verify-incoming",
    is_flag=True,
    help="HTTPS clients must present a certificate from the directory's CA (Consul's "
    "verify_incoming)",
)
@click.option(
    "--acl-bootstrap-token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="turn ACLs on: writes (and, with --acl-read-requires-token, reads) need this token",
)
@click.option("--acl-read-requires-token", is_flag=True, help="reads need the token too")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="keep the KV store, registrations and check statuses here (snapshot + fsync'd log), "
    "restored at start; default: nothing survives a restart",
)
def registry(
    host: str,
    port: int,
    datacenters: tuple[str, ...],
    tls_dir: str | None,
    verify_incoming: bool,
    acl_bootstrap_token_file: Path | None,
    acl_read_requires_token: bool,
    data_dir: Path | None,
) -> None:
    """Run the embedded Consul-compatible registry."""
    from kvmesh.discovery.registry import run_registry
    from kvmesh.discovery.registry.acl import AclConfig

    identity = _use_identity(tls_dir, Role.REGISTRY)
    if verify_incoming and identity is None:
        raise click.BadParameter("needs --tls-dir", param_hint="--verify-incoming")
    acl = None
    if acl_bootstrap_token_file is not None:
        try:
            acl = AclConfig.from_file(
                acl_bootstrap_token_file, reads_need_token=acl_read_requires_token
            )
        except ValueError as e:
            raise click.ClickException(str(e)) from e
    elif acl_read_requires_token:
        raise click.BadParameter("needs --acl-bootstrap-token-file")
    asyncio.run(
        run_registry(list(datacenters), host, port, acl, identity, verify_incoming, data_dir)
    )


def _use_identity(tls_dir: str | None, role: Role) -> TlsIdentity | None:
    from kvmesh.security import tls

    try:
        return tls.configure(tls_dir, role)
    except KvmeshError as e:
        raise click.ClickException(str(e)) from e


@main.group()
def certs() -> None:
    """Certificates for mutual TLS between kvmesh services."""


@certs.command("init")
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path))
@click.option("--cluster", default="local", show_default=True, help="named in every identity")
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="another DNS name or IP address for every certificate (repeatable)",
)
@click.option("--days", default=365, show_default=True, type=click.IntRange(min=1))
@click.option("--force", is_flag=True, help="replace an existing CA and certificates")
def certs_init(
    directory: Path, cluster: str, hosts: tuple[str, ...], days: int, force: bool
) -> None:
    """Write a CA and, for each role, DIR/<role>.pem and DIR/<role>-key.pem, each certificate
    naming its role as spiffe://kvmesh/<cluster>/<role>."""
    from kvmesh.security import certs as certificates

    try:
        written = certificates.init(directory, cluster=cluster, hosts=hosts, days=days, force=force)
    except KvmeshError as e:
        raise click.ClickException(str(e)) from e
    roles = ", ".join(r.value for r in Role)
    click.echo(f"wrote a CA and certificates for {roles} to {directory} ({len(written)} files)")


@main.command("bench-registry")
@click.option("--address", default=None, help="a running registry; default: start one")
@click.option("--port", default=0, show_default=True, help="port of the registry to start")
@click.option("--samples", default=200, show_default=True)
@click.option("--concurrency", default=8, show_default=True)
@click.option("--seconds", default=5.0, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def bench_registry(
    address: str | None,
    port: int,
    samples: int,
    concurrency: int,
    seconds: float,
    json_out: Path | None,
) -> None:
    """Registry notification latency and throughput."""
    from kvmesh.bench import registry as bench

    result = asyncio.run(
        bench.run(address, samples=samples, concurrency=concurrency, seconds=seconds, port=port)
    )
    _emit(result.as_dict(), json_out)


@main.command("bench-mesh")
@click.option("--prompt-tokens", default=1024, show_default=True)
@click.option("--max-tokens", default=32, show_default=True)
@click.option("--requests", default=10, show_default=True, help="per way in")
@click.option("--model", default="smollm2", show_default=True, help="e.g. dummy:llama-3.1-8b")
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda: one GPU each")
@click.option("--num-blocks", default=1024, show_default=True, help="KV blocks per worker")
@click.option(
    "--worker-arg",
    "worker_args",
    multiple=True,
    help="one more argv token for every worker (repeatable), e.g. --worker-arg=--no-cuda-graphs",
)
@click.option(
    "--secure-vs-plain",
    is_flag=True,
    help="run the mesh without and with `kvmesh up --secure`, alternating, and report the "
    "ratios (what mutual TLS and the rest cost)",
)
@click.option("--rounds", default=2, show_default=True, help="with --secure-vs-plain")
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def bench_mesh(
    prompt_tokens: int,
    max_tokens: int,
    requests: int,
    model: str,
    device: str,
    num_blocks: int,
    worker_args: tuple[str, ...],
    secure_vs_plain: bool,
    rounds: int,
    json_out: Path | None,
) -> None:
    """TTFT / ITL: disaggregated vs aggregated vs calling the decode worker directly."""
    from kvmesh.bench import mesh as bench

    settings: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens,
        "requests": requests,
        "model": model,
        "device": device,
        "num_blocks": num_blocks,
        "worker_args": worker_args,
    }
    if secure_vs_plain:
        result = asyncio.run(bench.compare_secure(rounds=rounds, **settings))
    else:
        result = asyncio.run(bench.run(**settings))
    _emit(result, json_out)


@main.command("bench-admission")
@click.option("--burst", default=64, show_default=True, help="requests sent at once")
@click.option("--max-in-flight", default=4, show_default=True, help="the router's")
@click.option("--max-queue", default=8, show_default=True, help="the router's")
@click.option("--max-tokens", default=32, show_default=True)
@click.option("--speed", default=0.1, show_default=True, help="the sim engine's speed")
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def bench_admission(
    burst: int,
    max_in_flight: int,
    max_queue: int,
    max_tokens: int,
    speed: float,
    json_out: Path | None,
) -> None:
    """A burst past the router's admission bounds (sim workers): admitted vs refused, and the
    admitted requests' p99 latency against one request alone."""
    from kvmesh.bench import admission

    if min(burst, max_in_flight, max_tokens) < 1 or max_queue < 0 or speed <= 0:
        raise click.BadParameter("burst, max-in-flight, max-tokens >= 1; max-queue >= 0; speed > 0")
    result = asyncio.run(
        admission.run(
            burst=burst,
            max_in_flight=max_in_flight,
            max_queue=max_queue,
            max_tokens=max_tokens,
            speed=speed,
        )
    )
    _emit(result, json_out)


@main.command("soak")
@click.option("--minutes", default=2.0, show_default=True, help="how long the traffic runs")
@click.option("--rate", default=5.0, show_default=True, help="requests a second (Poisson)")
@click.option("--kill-every", default=30.0, show_default=True, help="seconds between kills")
@click.option(
    "--targets",
    default=",".join(("prefill", "decode", "router", "registry")),
    show_default=True,
    help="comma-separated: which processes the chaos kills",
)
@click.option("--max-tokens", default=24, show_default=True)
@click.option("--speed", default=1.0, show_default=True, help="the sim engine's speed (1: an H100)")
@click.option("--seed", default=0, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def soak(
    minutes: float,
    rate: float,
    kill_every: float,
    targets: str,
    max_tokens: int,
    speed: float,
    seed: int,
    json_out: Path | None,
) -> None:
    """Traffic through `kvmesh up --routers 2 --prefill 2 --decode 2` (sim workers,
    supervised) while one random target is SIGKILLed every --kill-every seconds: failures by
    status, TTFT / ITL, greedy answers that differ, leaks."""
    from kvmesh.bench import soak as chaos

    chosen = tuple(t.strip() for t in targets.split(",") if t.strip())
    unknown = sorted(set(chosen) - set(chaos.TARGETS))
    if unknown or not chosen:
        raise click.BadParameter(
            f"unknown targets {unknown}; choose from {', '.join(chaos.TARGETS)}",
            param_hint="--targets",
        )
    if minutes <= 0 or rate <= 0 or kill_every <= 0 or max_tokens < 1 or speed <= 0:
        raise click.BadParameter("minutes, rate, kill-every and speed > 0; max-tokens >= 1")
    run = chaos.run(
        minutes=minutes,
        rate=rate,
        kill_every_s=kill_every,
        targets=chosen,
        max_tokens=max_tokens,
        speed=speed,
        seed=seed,
    )
    result = asyncio.run(_stopped_by_signals(run))
    if result is None:
        raise click.ClickException("stopped by a signal; the mesh was stopped")
    _emit(result, json_out)


async def _stopped_by_signals(coroutine: Coroutine[Any, Any, T]) -> T | None:
    """Run `coroutine`; SIGINT or SIGTERM cancels it (so its cleanup, such as stopping the mesh
    it started, runs) and gives None."""
    import signal

    task = asyncio.ensure_future(coroutine)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        return None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@main.command("bench")
@click.option("--url", default=None, help="an OpenAI-compatible server: http://host:port")
@click.option("--grpc", default=None, help="kvmesh's Generation API (the router): host:port")
@click.option("--model", default=None, help="default: the first model the server lists")
@click.option(
    "--workload",
    type=click.Choice(["shared-prefix", "multi-turn", "code-edit", "random"]),
    default="shared-prefix",
    show_default=True,
)
@click.option("--scale", default=1.0, show_default=True, help="multiply lengths and counts")
@click.option("--groups", type=int, default=None, help="shared-prefix [64]")
@click.option("--prompts-per-group", type=int, default=None, help="shared-prefix [16]")
@click.option("--system-prompt-len", type=int, default=None, help="shared-prefix [2048]")
@click.option("--question-len", type=int, default=None, help="shared-prefix [128]")
@click.option("--zipf", type=float, default=None, help="shared-prefix: group popularity skew [0]")
@click.option("--sessions", type=int, default=None, help="multi-turn [16], code-edit [8]")
@click.option("--turns", type=int, default=None, help="multi-turn [4], code-edit [8]")
@click.option("--turn-len", type=int, default=None, help="multi-turn [128]")
@click.option("--file-len", type=int, default=None, help="code-edit [2048]")
@click.option("--edit-len", type=int, default=None, help="code-edit [16]")
@click.option("--input-len", type=int, default=None, help="random [1024]")
@click.option("--range-ratio", type=float, default=None, help="random: lengths ±ratio [0]")
@click.option(
    "--output-len",
    type=int,
    default=None,
    help="answer tokens: shared-prefix [256], multi-turn [128], code-edit [64], random [128]",
)
@click.option("--rate", type=float, default=None, help="open loop: sessions/s (inf: all at once)")
@click.option("--arrival", type=click.Choice(["poisson", "gamma"]), default="poisson")
@click.option("--burstiness", type=float, default=None, help="gamma shape; <1 is burstier")
@click.option("--concurrency", type=int, default=None, help="closed loop: sessions in flight")
@click.option("--num-requests", type=int, default=None, help="default: the whole workload")
@click.option("--duration", type=float, default=None, help="seconds; no new requests after")
@click.option("--seed", default=0, show_default=True)
@click.option("--max-in-flight", default=256, show_default=True, help="open loop's safety cap")
@click.option("--request-timeout", default=300.0, show_default=True, help="seconds")
@click.option("--prompt-format", type=click.Choice(["tokens", "text"]), default="tokens")
@click.option("--tokenizer", default=None, help="text prompts: a tokenizer dir [smollm2's]")
@click.option("--slo-ttft-ms", type=float, default=None)
@click.option("--slo-itl-ms", type=float, default=None, help="on each request's mean ITL")
@click.option("--slo-e2e-ms", type=float, default=None)
@click.option("--api-key", default=None, help="HTTP: sent as a bearer token")
@click.option(
    "--worker-metrics",
    multiple=True,
    metavar="HOST:PORT",
    help="a worker's /metrics (repeatable): report its speculative decoding (drafts accepted)",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="results as JSON")
@click.option("--plot-dir", type=click.Path(path_type=Path), default=None, help="PNG plots")
def bench(out: Path | None, plot_dir: Path | None, **options: Any) -> None:
    """Load a server with a workload, open loop or closed, and report latency and throughput."""
    from kvmesh.bench import load

    try:
        config = load.config_from_options(options)
        result = load.run(config, handle_sigint=True)
    except load.ConfigError as e:
        raise click.UsageError(str(e)) from e
    except load.BenchError as e:
        raise click.ClickException(str(e)) from e
    except asyncio.CancelledError as e:  # a second Ctrl-C
        raise click.Abort() from e
    click.echo(load.render_summary(result))
    if out is not None:
        load.write_json(result, out)
    if plot_dir is not None:
        load.write_plots({"": result}, plot_dir)


def shared_prefix_options(fn: F) -> F:
    """The small shared-prefix workload's options, for the routing comparisons."""
    options = [
        click.option("--groups", default=8, show_default=True),
        click.option("--prompts-per-group", default=8, show_default=True),
        click.option("--system-prompt-len", default=512, show_default=True),
        click.option("--question-len", default=32, show_default=True),
        click.option("--output-len", default=16, show_default=True),
        click.option("--rate", default=1.0, show_default=True, help="requests/s (Poisson)"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _shared_prefix(options: dict[str, Any]) -> Any:
    """Pop the workload options (see `shared_prefix_options`) into a SharedPrefix, checked."""
    from kvmesh.bench import load

    names = ("groups", "prompts_per_group", "system_prompt_len", "question_len", "output_len")
    values = {name: options.pop(name) for name in names}
    if min(values.values()) < 1:
        raise click.BadParameter("workload counts and lengths must be at least 1")
    if not options["rate"] > 0:
        raise click.BadParameter("--rate must be positive", param_hint="--rate")
    return load.SharedPrefix(**values)


@main.command("bench-routing")
@shared_prefix_options
@click.option("--prefill", "num_prefill", default=3, show_default=True, help="prefill workers")
@click.option("--decode", "num_decode", default=1, show_default=True, help="decode workers")
@click.option(
    "--engine",
    default=_ENGINE_DEFAULTS.engine,
    show_default=True,
    help="the workers' engine; sim: simulated GPUs, no torch, and its own defaults for the "
    "options not given (64 groups x 8, 1024-token system prompts, 8 requests/s)",
)
@click.option(
    "--engine-arg",
    "engine_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="passed to every worker (repeatable); sim's defaults: gpu=H100 speed=0.05",
)
@click.option("--model", default=None, help="[smollm2; sim: dummy:llama-3.1-8b]")
@click.option("--zipf", default=1.2, show_default=True, help="skewed run's exponent; 0: skip it")
@click.option(
    "--policies",
    default=None,
    help="in order, from cache_aware, approximate (cache-aware without KV events), "
    "round_robin, random [cache_aware,round_robin,random; sim: cache_aware,approximate,"
    "round_robin]",
)
@click.option("--robustness/--no-robustness", default=True, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def bench_routing(json_out: Path | None, policies: str | None, **options: Any) -> None:
    """Cache-aware routing vs approximate, round-robin and random: hit rate, TTFT, decision
    time, balance, robustness. `--engine sim --prefill 32 --decode 32` fits a laptop."""
    from kvmesh.bench import routing

    if any("=" not in arg for arg in options["engine_args"]):
        raise click.BadParameter("takes KEY=VALUE", param_hint="--engine-arg")
    defaults: dict[str, Any] = {"policies": routing.DEFAULT_POLICIES}
    if options["engine"] == "sim":  # the sim's scale, for every option left at its default
        context = click.get_current_context()
        defaults = dict(routing.SIM_DEFAULTS)
        for name in ("groups", "prompts_per_group", "system_prompt_len", "question_len",
                     "output_len", "rate"):  # fmt: skip
            if context.get_parameter_source(name) is click.core.ParameterSource.DEFAULT:
                options[name] = defaults[name]
        given = dict(arg.partition("=")[::2] for arg in options["engine_args"])
        merged = dict(arg.partition("=")[::2] for arg in defaults["engine_args"]) | given
        options["engine_args"] = tuple(f"{key}={value}" for key, value in merged.items())
        options["model"] = options["model"] or defaults["model"]
        options["num_blocks"] = defaults["num_blocks"]
    chosen = (
        tuple(p.strip() for p in policies.split(",") if p.strip())
        if policies is not None
        else tuple(defaults["policies"])
    )
    if not chosen or set(chosen) - set(routing.POLICIES):
        raise click.BadParameter(
            f"policies must come from {routing.POLICIES}", param_hint="--policies"
        )
    workload = _shared_prefix(options)
    if options["num_prefill"] < 1 or options["num_decode"] < 1 or options["zipf"] < 0:
        raise click.BadParameter("--prefill and --decode must be at least 1, --zipf at least 0")
    bench = routing.RoutingBench(workload=workload, policies=chosen, **options)
    report = asyncio.run(routing.run(bench))
    _emit(report, json_out)
    click.echo(routing.render_table(report))


@main.command("bench-sglang")
@shared_prefix_options
@click.option(
    "--sglang-router",
    "sglang_python",
    default="python3",
    show_default=True,
    help="a Python interpreter that can import sglang_router (in a virtualenv of its own)",
)
@click.option("--decode", "num_decode", default=3, show_default=True, help="decode workers")
@click.option("--seed", default=0, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def bench_sglang(json_out: Path | None, **options: Any) -> None:
    """kvmesh's cache-aware router vs sglang-router's, same workers: hit rate and TTFT."""
    from kvmesh.bench import sglang_compare

    workload = _shared_prefix(options)
    if options["num_decode"] < 2:
        raise click.BadParameter("--decode must be at least 2", param_hint="--decode")
    bench = sglang_compare.CompareBench(workload=workload, **options)
    try:
        report = asyncio.run(sglang_compare.run(bench))
    except sglang_compare.SglangRouterError as e:
        raise click.ClickException(str(e)) from e
    _emit(report, json_out)


@main.command("bench-router", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_router(args: tuple[str, ...]) -> None:
    """Routing decision time and the prefix index's memory (see --help of the module)."""
    from services.router import bench_index

    bench_index.main(list(args), standalone_mode=True)


def _emit(report: dict[str, Any], json_out: Path | None) -> None:
    text = json.dumps(report, indent=2, default=str)
    click.echo(text)
    if json_out is not None:
        json_out.write_text(text + "\n")


@main.command("bench-autoscale")
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    type=click.Choice(["step", "zero", "failover", "cordon", "spillover"]),
    help="repeat; default: all, in this order",
)
@click.option("--model", default="smollm2", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--low-rate", default=0.5, show_default=True, help="requests/s before the step")
@click.option("--high-rate", default=4.0, show_default=True, help="requests/s after the step")
@click.option("--low-s", default=15.0, show_default=True)
@click.option("--high-s", default=40.0, show_default=True)
@click.option("--scale-down-delay-s", default=20.0, show_default=True)
@click.option("--window-s", default=10.0, show_default=True)
@click.option("--replica-concurrency", default=4, show_default=True)
@click.option("--ttft-target-s", default=2.0, show_default=True, help="spillover's TTFT target")
@click.option("--saturation-in-flight", default=3, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def bench_autoscale(json_out: Path | None, scenarios: tuple[str, ...], **options: Any) -> None:
    """Autoscaling, scale to zero, failover, cordon and spillover (issue 6's must-shows)."""
    from kvmesh.bench import autoscale

    bench = autoscale.AutoscaleBench(**options)
    _emit(asyncio.run(autoscale.run(bench, scenarios or autoscale.SCENARIOS)), json_out)


def _add_ctl() -> None:
    from kvmesh.ctl import ctl

    main.add_command(ctl)


_add_ctl()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
