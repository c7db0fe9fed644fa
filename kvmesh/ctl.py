"""`kvmesh ctl`: the operators' command line over the admin RPCs, printing readable tables.

    kvmesh ctl policy get MODEL TIER                     the autoscaler
    kvmesh ctl policy set MODEL TIER --min 0 --max 4 --mode sla --target-itl-s 0.05
    kvmesh ctl decisions [--model MODEL] [--limit 20]

    kvmesh ctl clusters                                  the control plane
    kvmesh ctl workers [--cluster C]
    kvmesh ctl deployments
    kvmesh ctl scale MODEL TIER REPLICAS [--cluster C]   pin a count in one cluster
    kvmesh ctl scale MODEL TIER --unpin [--cluster C]    back to the autoscaler
    kvmesh ctl drain WORKER_ID
    kvmesh ctl cordon CLUSTER | uncordon CLUSTER
    kvmesh ctl events [--limit 20]

The admin token comes from `--admin-token` or `KVMESH_ADMIN_TOKEN`, the autoscaler's address
from `--autoscaler` or `KVMESH_AUTOSCALER`, the control plane's from `--controlplane` or
`KVMESH_CONTROLPLANE`. A refused call prints its gRPC status and the server's message (e.g.
`INVALID_ARGUMENT: min_replicas ...`) and exits with status 1.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import click
import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from kvmesh import tiers
from kvmesh.api.v1 import (
    autoscaler_pb2,
    autoscaler_pb2_grpc,
    controlplane_pb2,
    controlplane_pb2_grpc,
)
from kvmesh.errors import KvmeshError
from kvmesh.rpc.channels import open_channel
from kvmesh.security import tls
from kvmesh.security.roles import Role

# Scale and Cordon answer after a reconcile pass; DrainWorker after the drain (no deadline here:
# the control plane's --drain-timeout-s bounds it).
_TIMEOUT_S = 30.0
_TIERS = {tier.value: tier.to_proto() for tier in tiers.Tier}
_MODES = {"load": autoscaler_pb2.SCALING_MODE_LOAD, "sla": autoscaler_pb2.SCALING_MODE_SLA}
# `policy set` options -> ScalingPolicy fields; an option left out keeps the current value.
_POLICY_OPTIONS = {
    "min_replicas": "min_replicas",
    "max_replicas": "max_replicas",
    "target_utilization": "target_utilization",
    "target_ttft_s": "target_ttft_s",
    "target_itl_s": "target_itl_s",
    "window_s": "window_s",
    "scale_down_delay_s": "scale_down_delay_s",
    "max_step": "max_step",
    "replica_concurrency": "replica_concurrency",
}
_CLUSTER_HEADERS = ("CLUSTER", "CORDONED", "HEALTHY", "WORKERS", "CAPACITY")
_DEPLOYMENT_HEADERS = ("MODEL", "TIER", "CLUSTER", "DESIRED", "READY", "PINNED")
_UINT32_MAX = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Target:
    """Where the admin RPCs go and the token they carry."""

    autoscaler: str
    controlplane: str
    token: str | None

    def call_autoscaler(
        self, method: str, request: Message, *, timeout_s: float | None = _TIMEOUT_S
    ) -> Any:
        """`Autoscaler.<method>(request)`: its response."""
        stub = autoscaler_pb2_grpc.AutoscalerStub
        return self._call(self.autoscaler, stub, method, request, timeout_s)

    def call_controlplane(
        self, method: str, request: Message, *, timeout_s: float | None = _TIMEOUT_S
    ) -> Any:
        """`ControlPlane.<method>(request)`: its response."""
        stub = controlplane_pb2_grpc.ControlPlaneStub
        return self._call(self.controlplane, stub, method, request, timeout_s)

    def _call(
        self,
        address: str,
        stub_class: Callable[[grpc.aio.Channel], Any],
        method: str,
        request: Message,
        timeout_s: float | None,
    ) -> Any:
        """One call with the bearer token on a channel of its own; a refusal becomes a readable
        click error (`Error: STATUS: message`, exit status 1)."""

        async def run() -> Any:
            async with open_channel(address, wait_for_ready=False) as channel:
                metadata = [("authorization", f"Bearer {self.token}")] if self.token else []
                rpc = getattr(stub_class(channel), method)
                return await rpc(request, metadata=metadata, timeout=timeout_s)

        try:
            return asyncio.run(run())
        except grpc.aio.AioRpcError as e:
            raise click.ClickException(f"{e.code().name}: {e.details()}") from None


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns as wide as their widest cell."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _cluster_row(cluster: controlplane_pb2.Cluster) -> tuple[object, ...]:
    return (
        cluster.name,
        _yes_no(cluster.cordoned),
        _yes_no(cluster.healthy),
        cluster.num_workers,
        cluster.capacity_replicas,
    )


def _deployment_row(deployment: controlplane_pb2.Deployment) -> tuple[object, ...]:
    return (
        deployment.model,
        tiers.from_proto(deployment.tier),
        deployment.cluster,
        deployment.desired_replicas,
        deployment.ready_replicas,
        _yes_no(deployment.pinned),
    )


def _local_time(timestamp: Timestamp) -> str:
    moment = datetime.fromtimestamp(timestamp.ToSeconds(), tz=timezone.utc).astimezone()
    return moment.isoformat(timespec="seconds")


def _policy_table(policy: autoscaler_pb2.ScalingPolicy) -> str:
    mode = {v: k for k, v in _MODES.items()}.get(policy.mode, str(policy.mode))
    tier = tiers.from_proto(policy.tier)
    rows = [
        ("model", policy.model),
        ("tier", tier),
        ("replicas", f"{policy.min_replicas} .. {policy.max_replicas}"),
        ("mode", mode),
        ("target utilization", policy.target_utilization),
        ("target TTFT (s)", policy.target_ttft_s),
        ("target ITL (s)", policy.target_itl_s),
        ("replica concurrency", policy.replica_concurrency),
        ("window (s)", policy.window_s),
        ("scale-down delay (s)", policy.scale_down_delay_s),
        ("max step", policy.max_step),
    ]
    return render_table(("field", "value"), rows)


@click.group()
@click.option(
    "--autoscaler", envvar="KVMESH_AUTOSCALER", default="127.0.0.1:50061", show_default=True
)
@click.option(
    "--controlplane", envvar="KVMESH_CONTROLPLANE", default="127.0.0.1:50071", show_default=True
)
@click.option(
    "--admin-token", envvar="KVMESH_ADMIN_TOKEN", default=None, help="or $KVMESH_ADMIN_TOKEN"
)
@click.option(
    "--tls-dir",
    envvar="KVMESH_TLS_DIR",
    default=None,
    help="call with the admin certificate of this `kvmesh certs init` directory (mutual TLS)",
)
@click.pass_context
def ctl(
    ctx: click.Context,
    autoscaler: str,
    controlplane: str,
    admin_token: str | None,
    tls_dir: str | None,
) -> None:
    """Operate the mesh: autoscaling policies and decisions, clusters, workers and deployments
    (admin RPCs)."""
    try:
        tls.configure(tls_dir, Role.ADMIN)
    except KvmeshError as e:
        raise click.ClickException(str(e)) from None
    ctx.obj = Target(autoscaler, controlplane, admin_token)


@ctl.group()
def policy() -> None:
    """Read or change a (model, tier)'s autoscaling policy."""


@policy.command("get")
@click.argument("model")
@click.argument("tier", type=click.Choice(sorted(_TIERS)))
@click.pass_obj
def policy_get(target: Target, model: str, tier: str) -> None:
    """The policy in force (the default when none was set)."""
    request = autoscaler_pb2.GetPolicyRequest(model=model, tier=_TIERS[tier])
    found = target.call_autoscaler("GetPolicy", request)
    click.echo(_policy_table(found))


@policy.command("set")
@click.argument("model")
@click.argument("tier", type=click.Choice(sorted(_TIERS)))
@click.option("--min", "min_replicas", type=int, default=None, help="0: scale to zero")
@click.option("--max", "max_replicas", type=int, default=None)
@click.option("--mode", type=click.Choice(sorted(_MODES)), default=None)
@click.option("--target-utilization", type=float, default=None)
@click.option("--target-ttft-s", type=float, default=None)
@click.option("--target-itl-s", type=float, default=None)
@click.option("--window-s", type=float, default=None)
@click.option("--scale-down-delay-s", type=float, default=None)
@click.option("--max-step", type=int, default=None)
@click.option("--replica-concurrency", type=int, default=None)
@click.pass_obj
def policy_set(target: Target, /, model: str, tier: str, mode: str | None, **values: Any) -> None:
    """Change some fields of the policy in force; the server checks the result."""
    request = autoscaler_pb2.GetPolicyRequest(model=model, tier=_TIERS[tier])
    current = target.call_autoscaler("GetPolicy", request)
    for option, field_name in _POLICY_OPTIONS.items():
        if values[option] is not None:
            if values[option] < 0:  # the proto's unsigned fields cannot carry it
                flag = "--" + option.replace("_replicas", "").replace("_", "-")
                raise click.BadParameter(f"must be >= 0, got {values[option]}", param_hint=flag)
            setattr(current, field_name, values[option])
    if mode is not None:
        current.mode = _MODES[mode]
    update = autoscaler_pb2.SetPolicyRequest(policy=current)
    stored = target.call_autoscaler("SetPolicy", update)
    click.echo(_policy_table(stored))


@ctl.command()
@click.option("--model", default="", help="only this model's")
@click.option("--limit", default=20, show_default=True)
@click.pass_obj
def decisions(target: Target, model: str, limit: int) -> None:
    """Recent autoscaling decisions, newest first, with their reasons."""
    if limit < 1:
        raise click.BadParameter("must be at least 1", param_hint="--limit")
    request = autoscaler_pb2.ListDecisionsRequest(model=model, limit=limit)
    found = target.call_autoscaler("ListDecisions", request)
    rows = [
        (
            datetime.fromtimestamp(d.time.ToSeconds(), tz=timezone.utc).strftime("%H:%M:%S"),
            d.model,
            tiers.from_proto(d.tier),
            d.current_replicas,
            d.desired_replicas,
            d.reason,
        )
        for d in found.decisions
    ]
    if not rows:
        click.echo("no decisions yet")
        return
    click.echo(render_table(("time", "model", "tier", "now", "want", "reason"), rows))


# -- the control plane ---------------------------------------------------------------------------


@ctl.command()
@click.pass_obj
def clusters(target: Target) -> None:
    """The clusters and their state.

    A cluster is a Consul datacenter; it is healthy when a router passes its check there.
    """
    found = target.call_controlplane("ListClusters", controlplane_pb2.ListClustersRequest())
    if not found.clusters:
        click.echo("no clusters")
        return
    click.echo(render_table(_CLUSTER_HEADERS, [_cluster_row(c) for c in found.clusters]))


@ctl.command()
@click.option("--cluster", default="", help="only this cluster's")
@click.pass_obj
def workers(target: Target, cluster: str) -> None:
    """The serving workers and their load.

    RUNNING and WAITING show `-` when the worker sent no load report.
    """
    request = controlplane_pb2.ListWorkersRequest(cluster=cluster)
    found = target.call_controlplane("ListWorkers", request)
    rows = [
        (
            w.worker_id,
            w.cluster,
            w.model,
            tiers.from_proto(w.tier),
            w.grpc_address,
            w.num_running if w.healthy else "-",
            w.num_waiting if w.healthy else "-",
        )
        for w in found.workers
    ]
    if not rows:
        click.echo(f"no workers in {cluster}" if cluster else "no workers")
        return
    headers = ("WORKER", "CLUSTER", "MODEL", "TIER", "ADDRESS", "RUNNING", "WAITING")
    click.echo(render_table(headers, rows))


@ctl.command()
@click.pass_obj
def deployments(target: Target) -> None:
    """Replicas per model, tier and cluster.

    PINNED: an operator's count (`scale`), which the autoscaler leaves alone.
    """
    found = target.call_controlplane("ListDeployments", controlplane_pb2.ListDeploymentsRequest())
    if not found.deployments:
        click.echo("no deployments")
        return
    click.echo(render_table(_DEPLOYMENT_HEADERS, [_deployment_row(d) for d in found.deployments]))


@ctl.command()
@click.argument("model")
@click.argument("tier", type=click.Choice(sorted(_TIERS)))
@click.argument("replicas", type=click.IntRange(0, _UINT32_MAX), required=False)
@click.option("--unpin", is_flag=True, help="remove the pin: the autoscaler sizes it again")
@click.option("--cluster", default="", help="needed when the control plane has several")
@click.pass_context
def scale(
    ctx: click.Context, model: str, tier: str, replicas: int | None, unpin: bool, cluster: str
) -> None:
    """Pin REPLICAS of MODEL's TIER in one cluster, or --unpin it."""
    if (replicas is None) != unpin:
        raise click.UsageError("give either REPLICAS or --unpin", ctx)
    request = controlplane_pb2.ScaleRequest(
        model=model, tier=_TIERS[tier], cluster=cluster, replicas=replicas or 0, unpin=unpin
    )
    target: Target = ctx.obj
    deployment = target.call_controlplane("Scale", request)
    click.echo(render_table(_DEPLOYMENT_HEADERS, [_deployment_row(deployment)]))


@ctl.command()
@click.argument("worker_id")
@click.pass_obj
def drain(target: Target, worker_id: str) -> None:
    """Drain a worker, then stop it.

    It takes no new requests and those in flight finish; the control plane starts a replacement
    when the replica is still wanted.
    """
    request = controlplane_pb2.DrainWorkerRequest(worker_id=worker_id)
    drained = target.call_controlplane("DrainWorker", request, timeout_s=None).drained
    if drained:
        click.echo(f"drained {worker_id}")
    else:
        click.echo(f"{worker_id}: requests still in flight when the drain timed out")


@ctl.command()
@click.argument("cluster")
@click.pass_obj
def cordon(target: Target, cluster: str) -> None:
    """Take a cluster out of service.

    The edge sends it no new requests and its replicas are drained and placed elsewhere.
    """
    request = controlplane_pb2.CordonClusterRequest(cluster=cluster)
    found = target.call_controlplane("CordonCluster", request)
    click.echo(render_table(_CLUSTER_HEADERS, [_cluster_row(found)]))


@ctl.command()
@click.argument("cluster")
@click.pass_obj
def uncordon(target: Target, cluster: str) -> None:
    """Put a cordoned cluster back in service."""
    request = controlplane_pb2.UncordonClusterRequest(cluster=cluster)
    found = target.call_controlplane("UncordonCluster", request)
    click.echo(render_table(_CLUSTER_HEADERS, [_cluster_row(found)]))


@ctl.command()
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.pass_obj
def events(target: Target, limit: int) -> None:
    """What the control plane did and what failed, newest first."""
    request = controlplane_pb2.ListEventsRequest(limit=min(limit, _UINT32_MAX))
    found = target.call_controlplane("ListEvents", request)
    rows = [(_local_time(e.time), e.kind, e.message) for e in found.events]
    if not rows:
        click.echo("no events yet")
        return
    click.echo(render_table(("TIME", "KIND", "MESSAGE"), rows))
