"""The load generator against an in-process `kvmesh.v1.Generation` server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kvmesh.bench import load
from kvmesh.rpc import RpcServer
from tests.integration.bench.fake_generation import (
    FIRST_ANSWER_ID,
    MODEL,
    FakeGeneration,
    start_fake_generation,
)


@pytest.fixture
async def router() -> AsyncIterator[tuple[FakeGeneration, RpcServer]]:
    fake, server = await start_fake_generation()
    yield fake, server
    await server.stop(0)


async def test_multi_turn_over_grpc_resends_the_real_answers(
    router: tuple[FakeGeneration, RpcServer],
) -> None:
    fake, server = router
    config = load.BenchConfig(
        target=server.address,
        protocol="grpc",
        workload=load.MultiTurn(sessions=2, turns=3, turn_len=5, output_len=4),
        arrivals=load.OpenLoop(rate=100.0),
    )
    result = await load.run_async(config)

    s = result.summary
    assert result.model == MODEL
    assert (s.num_ok, s.completion_tokens, s.prompt_tokens) == (6, 24, 2 * (5 + 14 + 23))
    assert s.cached_tokens == 2 * (5 + 14)  # each later turn hits its whole previous prompt
    for r in result.records:
        assert r.chunk_tokens == [1, 1, 1, 1]  # exact: every message names its token ids
        assert r.ttft_s is not None and r.e2e_s is not None and 0 < r.ttft_s <= r.e2e_s
    answer = [FIRST_ANSWER_ID + i for i in range(4)]
    for request in fake.requests:
        assert request.return_token_ids and request.sampling.ignore_eos
        assert request.sampling.temperature == 0 and request.sampling.max_tokens == 4
        ids = list(request.token_ids.ids)
        if len(ids) > 5:
            assert ids[-9:-5] == answer  # the previous turn's answer, then the new message


async def test_an_unreachable_router_fails_before_any_load() -> None:
    fake, server = await start_fake_generation()
    address = server.address
    await server.stop(0)
    config = load.BenchConfig(target=address, protocol="grpc")
    with pytest.raises(load.TargetUnreachableError, match="cannot reach"):
        await load.run_async(config)
    assert fake.requests == []
