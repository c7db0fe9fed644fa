"""`kvmesh up`: the whole mesh on one machine, as separate processes.

    embedded registry (one datacenter per cluster)
      -> per cluster: prefill and decode workers, a router
      -> one HTTP edge in front of every cluster's router (failover, spillover)
      -> with --autoscale: the autoscaler and the control plane, whose local actuator starts
         and drains the workers instead of `up`

Workers take the shared `extra_worker_args`, then their tier's (`extra_prefill_args`,
`extra_decode_args`), so a tier's flag wins over a shared one: e.g. prefill workers on
`--attention-backend sdpa` and decode workers on `paged`. Workers of different KV layouts
(block size, dtype) run side by side; the router pairs only those that can share KV.

Each child prints one line when it serves (`kvmesh/process.py`); `up` waits for those lines, then
for the edge's /health to say a request can be served, prints the endpoints, and on Ctrl-C or
SIGTERM stops the children in reverse order (SIGTERM, a grace period, then SIGKILL). Children's
logs go to files under `--log-dir`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import structlog

from kvmesh import models, tiers
from kvmesh.api.v1 import autoscaler_pb2, autoscaler_pb2_grpc
from kvmesh.process import Child, ChildStartError, start_child, stop_child, wait_ready
from kvmesh.rpc.channels import open_channel
from kvmesh.security import bundle, certs
from kvmesh.security.bundle import SecureBundle
from kvmesh.security.roles import Role
from kvmesh.security.tls import TLS_DIR_ENV, TlsIdentity

__all__ = ["Child", "Mesh", "UpConfig", "run", "worker_devices"]

log = structlog.get_logger(__name__)

DEFAULT_CLUSTER = "dc1"  # the embedded registry's datacenter when no --clusters are given


@dataclass(slots=True)
class UpConfig:
    model: str = "smollm2"
    num_prefill: int = 1  # per cluster (with autoscale: the policies' min replicas)
    num_decode: int = 1
    host: str = "127.0.0.1"
    registry_port: int = 8500
    router_port: int = 50051  # the first cluster's router; the others take free ports
    edge_port: int = 8000
    disagg_min_tokens: int = 64
    device: str = "auto"
    log_dir: Path = field(default_factory=lambda: Path(".kvmesh/logs"))
    start_timeout_s: float = 300.0
    grace_s: float = 10.0
    clusters: tuple[str, ...] = ()  # empty: one cluster, DEFAULT_CLUSTER
    autoscale: bool = False  # the control plane starts the workers; the autoscaler sizes them
    admin_token: str | None = None  # for the autoscaler's and control plane's admin RPCs
    capacity: int = 4  # with autoscale: replicas one cluster may hold
    autoscaler_tick_s: float = 2.0
    extra_worker_args: list[str] = field(default_factory=list)  # every worker's, both tiers
    extra_prefill_args: list[str] = field(default_factory=list)  # after the shared ones: win
    extra_decode_args: list[str] = field(default_factory=list)
    extra_router_args: list[str] = field(default_factory=list)
    extra_edge_args: list[str] = field(default_factory=list)
    extra_controlplane_args: list[str] = field(default_factory=list)
    tls_dir: Path | None = None  # mutual TLS between every service (certificates made if absent)
    # Everything of docs/security.md: mutual TLS, registry ACLs, the edge over HTTPS with API
    # keys, an admin token; secrets in tls_dir (default: next to the logs, `secure/`).
    secure: bool = False
    routers: int = 1  # per cluster; the edge balances over them and fails over among them
    # Restart a child that dies, with backoff, as Kubernetes restarts a pod (`kvmesh up` turns
    # it on; --no-restart turns it off). Off for tests that want a dead child to stay dead.
    restart: bool = False

    @property
    def cluster_names(self) -> tuple[str, ...]:
        return self.clusters or (DEFAULT_CLUSTER,)


class Mesh:
    """The running children; `start()` then `wait()`; `stop()` from anywhere."""

    def __init__(self, config: UpConfig) -> None:
        self.config = config
        self.children: list[Child] = []
        self.router_address = ""  # the first cluster's router
        self.routers: dict[str, str] = {}  # cluster -> its first router's address
        self.cluster_routers: dict[str, list[str]] = {}  # cluster -> every router's address
        # cluster -> its registry agent: host:port, or https://host:port with a TLS directory
        self.registries: dict[str, str] = {}
        self.edge_url = ""
        self.registry_address = ""  # the first cluster's agent
        self.autoscaler_address = ""
        self.controlplane_address = ""
        self.model_id = ""
        self._stopping = asyncio.Event()
        self._worker_args: list[str] = []
        self.bundle: SecureBundle | None = None
        self._launches: dict[str, _Launch] = {}  # child name -> how to start it again
        self._supervisors: dict[str, asyncio.Task[None]] = {}
        self._supervising = False
        self.restarts: dict[str, int] = {}  # child name -> times restarted (and ready again)

    async def start(self) -> None:
        config = self.config
        if config.autoscale and (config.extra_prefill_args or config.extra_decode_args):
            raise RuntimeError(
                "per-tier worker arguments need the workers `up` starts: not with autoscale, "
                "where the control plane starts them with the shared ones only"
            )
        if config.secure:
            config.tls_dir = config.tls_dir or config.log_dir.parent / "secure"
            self.bundle = bundle.prepare(config.tls_dir)
            config.admin_token = config.admin_token or self.bundle.admin_token
        elif config.tls_dir is not None and not (config.tls_dir / certs.CA_FILE).exists():
            certs.init(config.tls_dir)
        # Convert the model once here, so the workers don't all do it at the same time.
        source = await asyncio.to_thread(models.resolve, config.model)
        self.model_id = source.model_id
        py = [sys.executable, "-m"]
        clusters = config.cluster_names
        datacenters = [arg for name in clusters for arg in ("--datacenter", name)]
        registry = await self._spawn(
            "registry",
            [*py, "kvmesh.cli", "registry", "--host", config.host, "--port",
             str(config.registry_port), *datacenters, *self._registry_acl_args(),
             "--data-dir", str(self._registry_data_dir())],
            "kvmesh registry:",
            lines=len(clusters),
        )  # fmt: skip
        for line in registry.ready_lines:  # "kvmesh registry: NAME http(s)://HOST:PORT"
            _, _, name, url = line.split()
            self.registries[name] = url.removeprefix("http://")
        self.registry_address = self.registries[clusters[0]]
        per_cluster = (
            config.capacity if config.autoscale else config.num_prefill + config.num_decode
        )
        threads = max(1, (os.cpu_count() or 1) // max(per_cluster * len(clusters), 1))
        self._worker_args = [
            "--host", config.host, "--torch-threads", str(threads),
            "--metrics-port", "0", *config.extra_worker_args,
        ]  # fmt: skip
        starting = []
        if not config.autoscale:
            names = [
                (cluster, tier, _worker_name(cluster, tier, i, clusters))
                for cluster in clusters
                for tier, count in (("prefill", config.num_prefill), ("decode", config.num_decode))
                for i in range(count)
            ]
            devices = worker_devices(config.device, len(names))
            starting += [
                self._spawn(name, self._worker_argv(tier, cluster, device), f"{tier} serving")
                for (cluster, tier, name), device in zip(names, devices, strict=True)
            ]
        placed = [(c, j) for c in clusters for j in range(config.routers)]
        for cluster, j in placed:
            first = cluster == clusters[0] and j == 0
            args = ["--port", str(config.router_port) if first else "0", *config.extra_router_args]
            name = "router" if len(clusters) == 1 else f"router-{cluster}"
            name += f"-{j}" if j else ""
            starting.append(self._spawn(name, self._router_argv(args, cluster), "router serving"))
        started = await asyncio.gather(*starting)
        for (cluster, _), router in zip(placed, started[len(started) - len(placed) :], strict=True):
            self.cluster_routers.setdefault(cluster, []).append(router.address)
        self.routers = {c: addresses[0] for c, addresses in self.cluster_routers.items()}
        self.router_address = self.routers[clusters[0]]
        if config.autoscale:
            await self._start_scaling()
        # The edge finds each cluster's routers in the registry (and starts with these).
        listed = {c: ",".join(addresses) for c, addresses in self.cluster_routers.items()}
        if len(clusters) == 1:
            targets = ["--router", listed[clusters[0]]]
        else:
            targets = [a for c, r in listed.items() for a in ("--cluster", f"{c}={r}")]
        targets += ["--registry", self.registry_address, "--discover-routers"]
        self._write_prometheus_config()
        edge = await self._spawn(
            "edge",
            [*py, "services.edge", "--host", config.host, "--port", str(config.edge_port),
             *targets, *self._edge_security_args(), *config.extra_edge_args],
            "edge listening on",
        )  # fmt: skip
        self.edge_url = edge.address
        await self._wait_until_serving()

    async def _start_scaling(self) -> None:
        """The autoscaler (policies: min = the per-cluster counts x clusters) and the control
        plane, whose local actuator per cluster starts the workers."""
        config = self.config
        py = [sys.executable, "-m"]
        token = ["--admin-token", config.admin_token] if config.admin_token else []
        autoscaler = await self._spawn(
            "autoscaler",
            [*py, "services.autoscaler", "--registry", self.registry_address, "--host",
             config.host, "--port", "0", "--tick-s", str(config.autoscaler_tick_s),
             "--model", self.model_id, *token],
            "autoscaler serving",
        )  # fmt: skip
        self.autoscaler_address = autoscaler.address
        n = len(config.cluster_names)
        minimums = {"prefill": config.num_prefill * n, "decode": config.num_decode * n}
        for tier, low in minimums.items():
            await self.set_policy(
                tier, min_replicas=low, max_replicas=max(low, config.capacity * n, 1)
            )
        await self._decided_under(minimums)  # so the control plane never acts on defaults
        clusters = [a for c, r in self.registries.items() for a in ("--cluster", f"{c}={r}")]
        worker_args = [f"--worker-arg={a}" for a in self._worker_args]
        controlplane = await self._spawn(
            "controlplane",
            [*py, "services.controlplane", "--registry", self.registry_address, "--host",
             config.host, "--port", "0", *clusters, "--model", config.model,
             "--capacity", str(config.capacity), "--device", config.device,
             "--log-dir", str(config.log_dir), *worker_args, *token,
             *config.extra_controlplane_args],
            "controlplane serving",
        )  # fmt: skip
        self.controlplane_address = controlplane.address

    def _admin_channel(self, address: str) -> grpc.aio.Channel:
        """A channel for admin RPCs: with the admin certificate when the mesh runs mutual TLS."""
        tls_dir = self.config.tls_dir
        identity = TlsIdentity.load(tls_dir, Role.ADMIN) if tls_dir is not None else None
        return open_channel(address, wait_for_ready=False, identity=identity)

    def _admin_metadata(self) -> list[tuple[str, str]]:
        token = self.config.admin_token
        return [("authorization", f"Bearer {token}")] if token else []

    async def _decided_under(self, minimums: dict[str, int]) -> None:
        """Wait until the autoscaler's latest decision of each tier used the policy just set."""
        deadline = time.monotonic() + self.config.start_timeout_s
        async with self._admin_channel(self.autoscaler_address) as channel:
            stub = autoscaler_pb2_grpc.AutoscalerStub(channel)
            while time.monotonic() < deadline:
                response = await stub.ListDecisions(
                    autoscaler_pb2.ListDecisionsRequest(model=self.model_id),
                    metadata=self._admin_metadata(),
                )
                latest: dict[int, autoscaler_pb2.ScalingDecision] = {}
                for decision in response.decisions:  # newest first
                    latest.setdefault(decision.tier, decision)
                if all(
                    (last := latest.get(tiers.to_proto(tier))) is not None
                    and last.inputs.get("min_replicas") == low
                    for tier, low in minimums.items()
                ):
                    return
                await asyncio.sleep(0.2)  # the autoscaler ticks every autoscaler_tick_s
        raise RuntimeError("the autoscaler made no decision in time")

    async def set_policy(self, tier: str, **fields: float) -> None:
        """Store a scaling policy for the mesh's model through the autoscaler's RPC."""
        metadata = self._admin_metadata()
        proto_tier = tiers.to_proto(tier)
        async with self._admin_channel(self.autoscaler_address) as channel:
            stub = autoscaler_pb2_grpc.AutoscalerStub(channel)
            policy = await stub.GetPolicy(
                autoscaler_pb2.GetPolicyRequest(model=self.model_id, tier=proto_tier),
                metadata=metadata,
            )
            for name, value in fields.items():
                setattr(policy, name, value)
            await stub.SetPolicy(autoscaler_pb2.SetPolicyRequest(policy=policy), metadata=metadata)

    async def add_router(self, name: str, args: list[str], cluster: str | None = None) -> str:
        """Start another router on the same registry (e.g. another policy); its address."""
        argv = self._router_argv(["--port", "0", *args], cluster)
        child = await self._spawn(name, argv, "router serving")
        return child.address

    async def add_worker(
        self, tier: str, name: str, args: Sequence[str] = (), cluster: str | None = None
    ) -> Child:
        """Start another worker (a replacement, or one with other flags) after `start()`."""
        device = worker_devices(self.config.device, 1)[0]
        argv = [*self._worker_argv(tier, cluster, device), *args]
        return await self._spawn(name, argv, f"{tier} serving")

    async def add_edge(self, name: str, router_address: str) -> str:
        """Start another HTTP edge in front of a router; its URL."""
        argv = [sys.executable, "-m", "services.edge", "--host", self.config.host, "--port", "0",
                "--router", router_address]  # fmt: skip
        child = await self._spawn(name, argv, "edge listening on")
        return child.address

    def _worker_argv(self, tier: str, cluster: str | None, device: str) -> list[str]:
        registry = self.registries[cluster] if cluster else self.registry_address
        return [sys.executable, "-m", f"services.{tier}", "--registry", registry,
                "--model", self.config.model, *self._worker_args, "--device", device,
                *self._tier_args(tier)]  # fmt: skip

    def _tier_args(self, tier: str) -> list[str]:
        config = self.config
        return {"prefill": config.extra_prefill_args, "decode": config.extra_decode_args}[tier]

    def _router_argv(self, args: list[str], cluster: str | None = None) -> list[str]:
        config = self.config
        registry = self.registries[cluster] if cluster else self.registry_address
        primary = self.config.cluster_names[0]  # shared KV keys (wake) live in the first one
        return [
            sys.executable, "-m", "services.router", "--registry", registry,
            "--kv-datacenter", primary,
            "--model", config.model, "--host", config.host,
            "--disagg-min-tokens", str(config.disagg_min_tokens), "--metrics-port", "0", *args,
        ]  # fmt: skip

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def workers(self, tier: str) -> list[Child]:
        """The live workers `up` started, of a tier (those added later included)."""
        return [c for c in self.children if c.name.startswith(tier) and c.alive]

    async def wait(self) -> None:
        """Until stop() is called (a signal). Children that die are restarted (`restart`) or
        reported."""
        watchers = []
        if not self.config.restart:
            watchers = [asyncio.create_task(self._report_exit(c)) for c in self.children]
        await self._stopping.wait()
        for task in watchers:
            task.cancel()

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._supervisors.values():
            task.cancel()
        await asyncio.gather(*self._supervisors.values(), return_exceptions=True)
        for child in reversed(self.children):
            await stop_child(child, self.config.grace_s)

    def supervise(self) -> None:
        """Restart every child `up` started, and those started later, when it dies."""
        self._supervising = True
        for child in self.children:
            self._supervise(child.name)

    def _supervise(self, name: str) -> None:
        if name not in self._supervisors:
            self._supervisors[name] = asyncio.create_task(
                self._keep_running(name), name=f"supervise-{name}"
            )

    async def _keep_running(self, name: str) -> None:
        """Wait for the child to die; start it again after a backoff that doubles with each
        quick death (RESTART_BACKOFF_S, up to RESTART_BACKOFF_MAX_S) and resets once it has run
        for RESTART_RESET_AFTER_S, as Kubernetes' CrashLoopBackOff does."""
        failures = 0
        while not self._stopping.is_set():
            child = self.child(name)
            started = time.monotonic()
            code = await child.process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= RESTART_RESET_AFTER_S:
                failures = 0
            delay = restart_delay(failures)
            failures += 1
            _say(
                f"{name} exited with code {code}; restarting it in {delay:g} s "
                f"(restart {self.restarts.get(name, 0) + 1}, log {child.log_path})"
            )
            await asyncio.sleep(delay)  # the backoff
            if self._stopping.is_set():
                return
            try:
                restarted = await self._respawn(name, child)
            except ChildStartError as e:
                _say(f"{name} did not start again: {e}")
                continue  # the dead child again: the next, longer, backoff
            self.restarts[name] = self.restarts.get(name, 0) + 1
            _say(f"{name} restarted (pid {restarted.process.pid})")

    async def _respawn(self, name: str, dead: Child) -> Child:
        """Start a dead child again with its arguments, on the port it had (its clients and the
        banner know that address; workers take any port and register it anew)."""
        launch = self._launches[name]
        argv = launch.argv
        port = _port_of(dead)
        if port is not None and "--port" in argv:
            argv = _with_port(argv, port)
        await stop_child(dead, 0)  # already dead: this closes its log and stdout reader
        child = await start_child(name, argv, self.config.log_dir, launch.env)
        self.children[self.children.index(dead)] = child
        try:
            await wait_ready(
                child, launch.ready_prefix, self.config.start_timeout_s, lines=launch.lines
            )
        except ChildStartError:
            await stop_child(child, 0)
            raise
        return child

    async def _spawn(
        self, name: str, argv: list[str], ready_prefix: str, *, lines: int = 1
    ) -> Child:
        tls_dir = self.config.tls_dir
        env = {TLS_DIR_ENV: str(tls_dir)} if tls_dir is not None else {}
        if self.bundle is not None:  # every registry client writes with the ACL token
            env["CONSUL_HTTP_TOKEN_FILE"] = str(self.bundle.acl_token_file)
        child = await start_child(name, argv, self.config.log_dir, env or None)
        self.children.append(child)
        self._launches[name] = _Launch(argv, ready_prefix, lines, env or None)
        await wait_ready(child, ready_prefix, self.config.start_timeout_s, lines=lines)
        if self._supervising:
            self._supervise(name)
        return child

    @property
    def prometheus_config(self) -> Path:
        return self.config.log_dir / "prometheus.yml"

    def _write_prometheus_config(self) -> None:
        """A Prometheus configuration for this mesh (`prometheus.yml` next to the logs)."""
        edge_port = self.config.edge_port
        text = prometheus_config(
            self.registries,
            edge=f"{self.config.host}:{edge_port}" if edge_port else None,
            rules=ALERT_RULES if ALERT_RULES.exists() else None,
        )
        self.prometheus_config.parent.mkdir(parents=True, exist_ok=True)
        self.prometheus_config.write_text(text)

    def _registry_data_dir(self) -> Path:
        """Under the log directory, emptied at each `up`: the registry keeps its state across
        its own restarts (supervision, a crash), a new mesh starts empty."""
        directory = self.config.log_dir / "registry-data"
        shutil.rmtree(directory, ignore_errors=True)
        return directory

    def _registry_acl_args(self) -> list[str]:
        if self.bundle is None:
            return []
        return [
            "--acl-bootstrap-token-file", str(self.bundle.acl_token_file), "--verify-incoming",
        ]  # fmt: skip

    def _edge_security_args(self) -> list[str]:
        if self.bundle is None:
            return []
        directory = self.bundle.directory
        return [
            "--api-key-file", str(self.bundle.api_keys_file),
            "--tls-cert", str(directory / certs.cert_file(Role.EDGE)),
            "--tls-key", str(directory / certs.key_file(Role.EDGE)),
        ]  # fmt: skip

    def edge_ssl(self) -> ssl.SSLContext | None:
        """What a client of the edge trusts: the mesh's CA, under --secure."""
        if self.bundle is None:
            return None
        return ssl.create_default_context(cafile=str(self.bundle.ca))

    async def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        connector = aiohttp.TCPConnector(ssl=self.edge_ssl() or True)
        async with aiohttp.ClientSession(connector=connector) as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(f"{self.edge_url}/health") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)  # polling the edge's health endpoint
        raise RuntimeError("the mesh did not become ready in time")

    async def _report_exit(self, child: Child) -> None:
        code = await child.process.wait()
        if not self._stopping.is_set():
            print(f"kvmesh up: {child.name} exited with code {code}", file=sys.stderr)


ALERT_RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "alerts.yml"


def prometheus_config(
    registries: dict[str, str], *, edge: str | None, rules: Path | None, interval_s: int = 5
) -> str:
    """Prometheus's YAML for a mesh: the services through the first registry agent's HTTP
    service discovery (`/v1/kvmesh/prometheus/targets`: every datacenter's passing instances
    with a metrics port), the edge at its address, the alert rules."""
    agent = next(iter(registries.values()))
    url = agent if "://" in agent else f"http://{agent}"
    lines = [
        "# Written by `kvmesh up`: prometheus --config.file=<this file>",
        "global:",
        f"  scrape_interval: {interval_s}s",
        f"  evaluation_interval: {interval_s}s",
    ]
    if rules is not None:
        lines += ["rule_files:", f"  - {rules}"]
    lines += [
        "scrape_configs:",
        "  - job_name: kvmesh",
        "    http_sd_configs:",
        f"      - url: {url}/v1/kvmesh/prometheus/targets",
        f"        refresh_interval: {interval_s}s",
    ]
    if edge is not None:
        lines += [
            "  - job_name: kvmesh-edge",
            "    static_configs:",
            f"      - targets: ['{edge}']",
            "        labels: {service: kvmesh-edge}",
        ]
    return "\n".join(lines) + "\n"


RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
RESTART_RESET_AFTER_S = 60.0


@dataclass(frozen=True, slots=True)
class _Launch:
    argv: list[str]
    ready_prefix: str
    lines: int
    env: dict[str, str] | None


def restart_delay(quick_deaths: int) -> float:
    """The wait before a restart, after this many deaths in a row that came quickly."""
    return float(min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2**quick_deaths))


def _say(message: str) -> None:
    print(f"kvmesh up: {message}", file=sys.stderr, flush=True)
    log.warning(message)


def _port_of(child: Child) -> int | None:
    """The port a child listened on, from its ready line (a URL or host:port)."""
    if not child.ready_line:
        return None
    url_last = child.ready_line.startswith(("edge", "kvmesh registry"))
    address = child.ready_line.split()[-1] if url_last else child.address
    port = address.rstrip("/").rpartition(":")[2]
    return int(port) if port.isdigit() else None


def _with_port(argv: list[str], port: int) -> list[str]:
    pinned = list(argv)
    pinned[len(argv) - 1 - argv[::-1].index("--port") + 1] = str(port)
    return pinned


def _secure_examples(mesh: Mesh, model: str) -> str:
    assert mesh.bundle is not None
    url, ca, key = mesh.edge_url, mesh.bundle.ca, mesh.bundle.api_key
    d = mesh.bundle.directory
    return f"""
  logs                    {mesh.config.log_dir}/
  secrets                 {d}/ (certificates, acl-token, admin-token, api-keys.txt)

Secure: every gRPC call is mutual TLS with a role per service, the registry needs the ACL token
to write, the edge serves HTTPS and needs an API key (docs/security.md).

Try it:
  curl -s --cacert {ca} {url}/v1/chat/completions \\
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi!"}}]}}'

  python -c 'import httpx; from openai import OpenAI
c = OpenAI(base_url="{url}/v1", api_key="{key}", http_client=httpx.Client(verify="{ca}"))
print(c.chat.completions.create(model="{model}",
      messages=[{{"role": "user", "content": "Tell me a joke"}}]).choices[0].message.content)'

  grpcurl -cacert {ca} -cert {d}/admin.pem -key {d}/admin-key.pem -authority kvmesh \\
    {mesh.router_address} kvmesh.v1.Generation/ListModels

  curl -s --cacert {ca} --cert {d}/admin.pem --key {d}/admin-key.pem \\
    -H "X-Consul-Token: $(cat {d}/acl-token)" {mesh.registry_address}/v1/catalog/services

Ctrl-C stops everything.
"""


def _worker_name(cluster: str, tier: str, i: int, clusters: Sequence[str]) -> str:
    return f"{tier}-{i}" if len(clusters) == 1 else f"{tier}-{cluster}-{i}"


def worker_devices(device: str, num_workers: int) -> list[str]:
    """Each worker's device: `cuda` (or `auto` with GPUs) spreads the workers over the GPUs,
    prefill workers first, so one prefill and one decode worker on two GPUs get one each."""
    import torch

    gpus = torch.cuda.device_count()
    if device not in ("cuda", "auto") or gpus == 0:
        return [device] * num_workers
    return [f"cuda:{i % gpus}" for i in range(num_workers)]


def banner(mesh: Mesh) -> str:
    url = mesh.edge_url
    config = mesh.config
    model = "SmolLM2-135M-Instruct" if config.model == "smollm2" else config.model
    workers = f"{config.num_prefill} prefill + {config.num_decode} decode worker(s)"
    if config.autoscale:
        workers = f"at least {workers}, autoscaled"
    lines = [f"kvmesh is up: {workers} in each of {', '.join(config.cluster_names)}"]
    lines.append(
        f"  OpenAI-compatible HTTP  {url}/v1   (health {url}/health, metrics {url}/metrics)"
    )
    for cluster, addresses in mesh.cluster_routers.items():
        lines.append(f"  gRPC Generation API     {', '.join(addresses)}   ({cluster})")
    for cluster, registry in mesh.registries.items():
        url = registry if "://" in registry else f"http://{registry}"
        lines.append(f"  registry (Consul API)   {url}   ({cluster})")
    if config.autoscale:
        lines.append(f"  autoscaler (admin)      {mesh.autoscaler_address}")
        lines.append(f"  control plane (admin)   {mesh.controlplane_address}")
        ctl = f"kvmesh ctl --autoscaler {mesh.autoscaler_address} "
        ctl += f"--controlplane {mesh.controlplane_address}"
        if config.tls_dir is not None:
            ctl += f" --tls-dir {config.tls_dir}"
        lines.append(f"  try                     {ctl} clusters")
    if config.tls_dir is not None:
        lines.append(f"  mutual TLS (gRPC)       certificates in {config.tls_dir}/")
        router = next(iter(mesh.routers.values()), "")
        lines.append(
            f"  grpcurl                 grpcurl -cacert {config.tls_dir}/ca.pem -cert "
            f"{config.tls_dir}/admin.pem -key {config.tls_dir}/admin-key.pem -authority "
            f"{certs.TARGET_NAME} {router} list"
        )
    endpoints = "\n".join(lines)
    if mesh.bundle is not None:
        return endpoints + _secure_examples(mesh, model)
    return f"""
{endpoints}
  logs                    {mesh.config.log_dir}/

Try it:
  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi!"}}]}}'

  curl -sN {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "stream": true, "messages": [{{"role": "user", "content": "Hi!"}}]}}'

  python -c 'from openai import OpenAI
c = OpenAI(base_url="{url}/v1", api_key="none")
print(c.chat.completions.create(model="{model}",
      messages=[{{"role": "user", "content": "Tell me a joke"}}]).choices[0].message.content)'

Ctrl-C stops everything.
"""


async def run(config: UpConfig) -> None:
    mesh = Mesh(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, mesh.request_stop)
    try:
        starting = asyncio.create_task(mesh.start())
        stop_wait = asyncio.create_task(mesh._stopping.wait())
        done, _ = await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            stop_wait.cancel()
            starting.result()
            print(banner(mesh), flush=True)
            if config.restart:
                mesh.supervise()
            await mesh.wait()
        else:
            starting.cancel()
    finally:
        print("kvmesh up: stopping ...", file=sys.stderr, flush=True)
        await mesh.stop()
        print("kvmesh up: stopped", file=sys.stderr, flush=True)
