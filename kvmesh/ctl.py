"""`kvmesh ctl`: the operators' command line over the admin RPCs, printing readable tables.

    kvmesh ctl policy get MODEL TIER
    kvmesh ctl policy set MODEL TIER --min 0 --max 4 --mode sla --target-itl-s 0.05
    kvmesh ctl decisions [--model MODEL] [--limit 20]

The admin token comes from `--admin-token` or `KVMESH_ADMIN_TOKEN`, the autoscaler's address
from `--autoscaler` or `KVMESH_AUTOSCALER`. A refused call prints its gRPC status and the
server's message (e.g. `INVALID_ARGUMENT: min_replicas ...`) and exits with status 1.
(So far the autoscaler's commands; the control plane's come with it.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import click
import grpc

from kvmesh.api.v1 import autoscaler_pb2, autoscaler_pb2_grpc, common_pb2

T = TypeVar("T")

_TIERS = {"prefill": common_pb2.TIER_PREFILL, "decode": common_pb2.TIER_DECODE}
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


@dataclass(frozen=True, slots=True)
class Target:
    autoscaler: str
    token: str | None

    def call(self, rpc: Callable[[Any, Sequence[tuple[str, str]]], Awaitable[T]]) -> T:
        """Run one RPC on the autoscaler; a refusal becomes a readable click error."""

        async def run() -> T:
            async with grpc.aio.insecure_channel(self.autoscaler) as channel:
                metadata = [("authorization", f"Bearer {self.token}")] if self.token else []
                return await rpc(autoscaler_pb2_grpc.AutoscalerStub(channel), metadata)

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


def _policy_table(policy: autoscaler_pb2.ScalingPolicy) -> str:
    mode = {v: k for k, v in _MODES.items()}.get(policy.mode, str(policy.mode))
    tier = {v: k for k, v in _TIERS.items()}.get(policy.tier, str(policy.tier))
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
    "--admin-token", envvar="KVMESH_ADMIN_TOKEN", default=None, help="or $KVMESH_ADMIN_TOKEN"
)
@click.pass_context
def ctl(ctx: click.Context, autoscaler: str, admin_token: str | None) -> None:
    """Operate the mesh: autoscaling policies and decisions (admin RPCs)."""
    ctx.obj = Target(autoscaler, admin_token)


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
    found = target.call(lambda stub, md: stub.GetPolicy(request, metadata=md, timeout=10))
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
    current = target.call(lambda stub, md: stub.GetPolicy(request, metadata=md, timeout=10))
    for option, field_name in _POLICY_OPTIONS.items():
        if values[option] is not None:
            if values[option] < 0:  # the proto's unsigned fields cannot carry it
                flag = "--" + option.replace("_replicas", "").replace("_", "-")
                raise click.BadParameter(f"must be >= 0, got {values[option]}", param_hint=flag)
            setattr(current, field_name, values[option])
    if mode is not None:
        current.mode = _MODES[mode]
    update = autoscaler_pb2.SetPolicyRequest(policy=current)
    stored = target.call(lambda stub, md: stub.SetPolicy(update, metadata=md, timeout=10))
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
    found = target.call(lambda stub, md: stub.ListDecisions(request, metadata=md, timeout=10))
    tiers = {v: k for k, v in _TIERS.items()}
    rows = [
        (
            datetime.fromtimestamp(d.time.ToSeconds(), tz=timezone.utc).strftime("%H:%M:%S"),
            d.model,
            tiers.get(d.tier, str(d.tier)),
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
