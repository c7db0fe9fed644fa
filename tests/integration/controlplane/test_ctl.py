"""`kvmesh ctl` against a real control plane process: tables, refusals printed readably, usage
errors, and a scale / drain through a real worker.

The command runs in a thread (it starts its own event loop) while the registry runs in the
test's.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from click.testing import CliRunner, Result

from kvmesh.cli import main
from tests.integration.controlplane.test_service import (
    CAPACITY,
    MODEL,
    TOKEN,
    ControlPlane,
    controlplane,
    eventually,
)

__all__ = ["controlplane"]  # the fixture, shared with test_service

CLEAN_ENV: dict[str, str | None] = {"KVMESH_ADMIN_TOKEN": None, "KVMESH_CONTROLPLANE": None}


async def ctl(target: ControlPlane, *args: str, token: str | None = TOKEN) -> Result:
    options = ["ctl", "--controlplane", target.address]
    if token is not None:
        options += ["--admin-token", token]
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, main, [*options, *args], env=CLEAN_ENV)


def table(result: Result) -> list[list[str]]:
    assert result.exit_code == 0, result.output
    return [line.split() for line in result.output.splitlines()]


async def test_clusters_prints_a_table(controlplane: ControlPlane) -> None:
    assert table(await ctl(controlplane, "clusters")) == [
        ["CLUSTER", "CORDONED", "HEALTHY", "WORKERS", "CAPACITY"],
        ["eu-west", "no", "no", "0", str(CAPACITY)],
        ["us-east", "no", "no", "0", str(CAPACITY)],
    ]


async def test_cordon_and_uncordon_print_the_cluster_and_show_as_events(
    controlplane: ControlPlane,
) -> None:
    cordoned = table(await ctl(controlplane, "cordon", "us-east"))
    assert cordoned == [
        ["CLUSTER", "CORDONED", "HEALTHY", "WORKERS", "CAPACITY"],
        ["us-east", "yes", "no", "0", str(CAPACITY)],
    ]
    uncordoned = table(await ctl(controlplane, "uncordon", "us-east"))
    assert uncordoned[1][:2] == ["us-east", "no"]

    header, newest, older = table(await ctl(controlplane, "events", "--limit", "2"))
    assert header == ["TIME", "KIND", "MESSAGE"]
    assert newest[1:] == ["uncordon", "us-east", "uncordoned"]
    assert older[1:] == ["cordon", "us-east", "cordoned"]
    when = datetime.fromisoformat(newest[0])
    assert when.tzinfo is not None and when.microsecond == 0  # local time, to the second
    assert abs(datetime.now().astimezone() - when) < timedelta(minutes=5)


async def test_refusals_are_printed_readably(controlplane: ControlPlane) -> None:
    no_token = await ctl(controlplane, "clusters", token=None)
    assert no_token.exit_code == 1
    assert no_token.output.startswith("Error: UNAUTHENTICATED: ")
    too_many = await ctl(controlplane, "scale", MODEL, "decode", "3", "--cluster", "eu-west")
    assert too_many.exit_code == 1
    assert too_many.output == (
        "Error: INVALID_ARGUMENT: replicas (3) exceed cluster eu-west's capacity (2)\n"
    )
    which = await ctl(controlplane, "scale", MODEL, "decode", "1")
    assert which.exit_code == 1
    assert "Error: INVALID_ARGUMENT: " in which.output and "eu-west, us-east" in which.output
    unknown = await ctl(controlplane, "drain", "decode-0000")
    assert unknown.exit_code == 1
    assert unknown.output.startswith("Error: NOT_FOUND: ")
    assert "Traceback" not in no_token.output + too_many.output + which.output + unknown.output


async def test_scale_needs_replicas_or_unpin_but_not_both(controlplane: ControlPlane) -> None:
    for args in [(), ("1", "--unpin")]:
        misuse = await ctl(controlplane, "scale", MODEL, "decode", *args, "--cluster", "eu-west")
        assert misuse.exit_code == 2
        assert "Usage:" in misuse.output and "ctl scale" in misuse.output
        assert "give either REPLICAS or --unpin" in misuse.output
    negative = await ctl(controlplane, "scale", MODEL, "decode", "--cluster", "eu-west", "--", "-1")
    assert negative.exit_code == 2
    assert "-1 is not in the range" in negative.output


async def test_scale_workers_deployments_and_drain_with_a_real_worker(
    controlplane: ControlPlane,
) -> None:
    pinned = table(await ctl(controlplane, "scale", MODEL, "decode", "1", "--cluster", "eu-west"))
    assert pinned == [
        ["MODEL", "TIER", "CLUSTER", "DESIRED", "READY", "PINNED"],
        [MODEL, "decode", "eu-west", "1", "0", "yes"],
    ]
    listed = await eventually(
        lambda: ctl(controlplane, "workers", "--cluster", "eu-west"),
        lambda result: result.exit_code == 0 and "no workers" not in result.output,
        what="a worker in eu-west",
    )
    header, (worker_id, *row) = table(listed)
    assert header == ["WORKER", "CLUSTER", "MODEL", "TIER", "ADDRESS", "RUNNING", "WAITING"]
    assert row[:3] == ["eu-west", MODEL, "decode"] and row[4:] == ["0", "0"]
    assert row[3].startswith("127.0.0.1:")
    assert [MODEL, "decode", "eu-west", "1", "1", "yes"] in table(
        await ctl(controlplane, "deployments")
    )

    # Unpinned, the deployment is left as it is (no autoscaler here wants it), so the drained
    # worker is not replaced and nothing is left running.
    _, unpinned = table(
        await ctl(controlplane, "scale", MODEL, "decode", "--unpin", "--cluster", "eu-west")
    )
    assert unpinned[:3] == [MODEL, "decode", "eu-west"] and unpinned[5] == "no"
    drained = await ctl(controlplane, "drain", worker_id)
    assert (drained.exit_code, drained.output) == (0, f"drained {worker_id}\n")
    assert (await ctl(controlplane, "workers")).output == "no workers\n"
