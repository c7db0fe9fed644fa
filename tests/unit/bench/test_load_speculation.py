"""`kvmesh bench --worker-metrics`: the workers' speculation counters, before and after a run."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from kvmesh.bench.load.errors import BenchError
from kvmesh.bench.load.speculation import SpeculationStats, difference, read_counters


@pytest.fixture
async def worker_metrics() -> AsyncIterator[tuple[str, dict[str, float]]]:
    """A /metrics endpoint on 127.0.0.1 whose counters the test sets."""
    counters = {"verifications": 0.0, "draft": 0.0, "accepted": 0.0}

    async def metrics(_: web.Request) -> web.Response:
        names = {
            "verifications": "verifications",
            "draft": "draft_tokens",
            "accepted": "accepted_tokens",
        }
        lines = ["# TYPE kvmesh_engine_spec_verifications_total counter"] + [
            f'kvmesh_engine_spec_{names[key]}_total{{tier="decode"}} {value}'
            for key, value in counters.items()
        ]
        return web.Response(text="\n".join(lines) + "\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"127.0.0.1:{port}", counters
    finally:
        await runner.cleanup()


async def test_the_difference_over_a_run_gives_acceptance_and_tokens_per_step(
    worker_metrics: tuple[str, dict[str, float]],
) -> None:
    address, counters = worker_metrics
    counters.update(verifications=10, draft=40, accepted=20)
    before = await read_counters([address, address])  # summed over the workers given
    assert before == SpeculationStats(20, 80, 40)
    counters.update(verifications=30, draft=120, accepted=80)
    run = difference(before, await read_counters([address, address]))
    assert run == SpeculationStats(40, 160, 120)
    assert run.acceptance_rate == 0.75
    assert run.tokens_per_verification == 4.0  # 3 accepted drafts + the model's token
    assert "acceptance 75.0% (120 of 160 drafts), 4.00 tokens per verify step" in run.describe()
    assert run.as_dict()["accepted_tokens_per_verification"] == 3.0


def test_no_verification_says_so() -> None:
    assert "no drafts verified" in SpeculationStats(0, 0, 0).describe()
    assert SpeculationStats(0, 0, 0).acceptance_rate is None


async def test_a_bad_address_is_a_clear_error() -> None:
    with pytest.raises(BenchError, match="host:port"):
        await read_counters(["nowhere"])
