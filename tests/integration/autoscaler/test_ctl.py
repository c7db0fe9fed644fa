"""`kvmesh ctl` against the Autoscaler RPCs on loopback: tables, and refusals printed readably.

The command runs in a thread (it starts its own event loop) while the server runs in the test's.
"""

from __future__ import annotations

import asyncio

from click.testing import CliRunner, Result

from kvmesh.cli import main
from services.autoscaler.loop import AutoscalerLoop
from services.autoscaler.policy import Policy
from tests.integration.autoscaler.test_service import TOKEN, FixedObserver, Service, service

__all__ = ["service"]  # the fixture, shared with test_service


async def ctl(target: Service, *args: str, token: str | None = TOKEN) -> Result:
    options = ["ctl", "--autoscaler", target.address]
    if token is not None:
        options += ["--admin-token", token]
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, main, [*options, *args], env={})


async def test_policy_set_and_get_print_tables(service: Service) -> None:
    done = await ctl(service, "policy", "set", "org/m", "decode", "--min", "0", "--max", "3")
    assert done.exit_code == 0, done.output
    assert "replicas" in done.output and "0 .. 3" in done.output
    shown = await ctl(service, "policy", "get", "org/m", "decode")
    assert shown.exit_code == 0, shown.output
    assert "0 .. 3" in shown.output
    assert (await service.store.get("org/m", "decode")).max_replicas == 3


async def test_refusals_are_printed_readably(service: Service) -> None:
    no_token = await ctl(service, "policy", "get", "org/m", "decode", token=None)
    assert no_token.exit_code == 1
    assert "Error: UNAUTHENTICATED:" in no_token.output
    assert "Traceback" not in no_token.output
    bad = await ctl(service, "policy", "set", "org/m", "decode", "--min", "5", "--max", "2")
    assert bad.exit_code == 1
    assert "Error: INVALID_ARGUMENT:" in bad.output and "min_replicas" in bad.output
    unknown_tier = await ctl(service, "policy", "get", "org/m", "aggregated")
    assert unknown_tier.exit_code == 2
    assert "'aggregated' is not one of" in unknown_tier.output


async def test_decisions_print_their_reasons(service: Service) -> None:
    empty = await ctl(service, "decisions")
    assert empty.exit_code == 0 and "no decisions yet" in empty.output
    await service.store.put(Policy(model="org/m", tier="decode", replica_concurrency=2))
    observer = FixedObserver(ready=1, in_flight=6)  # 6 / (2 x 0.7) needs 5: +2 (max step 2)
    loop = AutoscalerLoop(service.store, observer, service.decisions, service.discovery)
    await loop.tick()
    shown = await ctl(service, "decisions", "--model", "org/m")
    assert shown.exit_code == 0, shown.output
    header, row = shown.output.splitlines()[:2]
    assert header.split()[:5] == ["time", "model", "tier", "now", "want"]
    assert row.split()[1:5] == ["org/m", "decode", "1", "3"]
    assert "max step 2" in row
