"""Async scheduling: a step is launched before the previous one is read. Nothing the requests
see may change, and blocks freed while a step runs are not written by others until it is done."""

from __future__ import annotations

import dataclasses
import random

from kvmesh.engine.sequence import PENDING
from kvmesh.kv.block_pool import BlockId
from kvmesh.kv.hashing import hash_blocks
from kvmesh.sampling import SamplingParams, TokenLogprob
from kvmesh.types import GenerateRequest, PrefillOutput, TokenOutput
from tests.helpers import run_until_idle
from tests.unit.engine.test_core import prompts, tiny


def _mixed_workload(seed: int) -> list[GenerateRequest]:
    """Requests that end every way: max_tokens, a stop token, EOS, the context limit; greedy,
    seeded sampling and logprobs side by side."""
    rng = random.Random(seed)
    requests = []
    for i, prompt in enumerate(prompts(24, seed=seed, low=1, high=40)):
        kind = i % 4
        params = SamplingParams(max_tokens=rng.randint(1, 30), temperature=0.0, ignore_eos=True)
        if kind == 1:  # stops at a token it is likely to produce
            params = SamplingParams(30, 0.0, stop_token_ids=tuple(range(0, 1000, 7)))
        elif kind == 2:
            params = SamplingParams(20, 1.0, top_k=40, seed=i, logprobs=True, top_logprobs=2)
        elif kind == 3:  # runs into the context limit (max_model_len 80 below)
            params = SamplingParams(max_tokens=80 - len(prompt), temperature=0.0, ignore_eos=True)
        requests.append(GenerateRequest(f"m{i}", tuple(prompt), params))
    return requests


def _run(async_scheduling: bool, requests: list[GenerateRequest], **config: object) -> list:  # type: ignore[type-arg]
    core = tiny(async_scheduling=async_scheduling, max_model_len=80, **config)
    core.eos_token_ids = frozenset({11, 12, 13})  # some requests end by EOS
    for request in requests:
        core.add(request)
    outputs = [o for o in run_until_idle(core) if isinstance(o, TokenOutput)]
    assert core.is_idle_and_whole()
    # Each request's outputs in order. Logprobs to 4 places: the batches differ (a request that
    # ended is computed one step more), and batch shape moves float sums in the last bits.
    rounded = [dataclasses.replace(o, logprobs=[_round(lp) for lp in o.logprobs]) for o in outputs]
    return sorted(rounded, key=lambda o: o.request_id)


def _round(lp: TokenLogprob) -> TokenLogprob:
    top = tuple((token, round(value, 4)) for token, value in lp.top)
    return TokenLogprob(lp.token_id, round(lp.logprob, 4), top)


def test_async_scheduling_changes_no_output() -> None:
    requests = _mixed_workload(seed=3)
    sync = _run(False, requests)
    assert _run(True, requests) == sync
    reasons = {o.finish_reason for o in sync if o.finished}
    assert len(reasons) >= 1 and all(o.finished for o in sync if o.finish_reason)


def test_async_scheduling_under_preemption_changes_no_output() -> None:
    requests = _mixed_workload(seed=5)
    small = {"num_blocks": 20, "max_num_seqs": 6, "max_num_batched_tokens": 16}
    assert _run(True, requests, **small) == _run(False, requests, **small)


def test_a_pending_token_is_never_hashed_or_cached() -> None:
    core = tiny(async_scheduling=True)
    core.add(GenerateRequest("p", tuple(range(3, 10)), SamplingParams(12, 0.0, ignore_eos=True)))
    for _ in range(3):
        core.step()
        seq = core._requests["p"]
        assert seq.token_ids[-1] == PENDING and seq.num_pending >= 1
        known = seq.token_ids[: seq.num_resolved_tokens]
        expected = hash_blocks(known, core.block_size, seq.root)
        assert seq.block_hashes == expected[: len(seq.block_hashes)]
    run_until_idle(core)
    assert core.is_idle_and_whole()


def test_a_prefill_only_request_is_not_decoded_ahead() -> None:
    core = tiny(async_scheduling=True)
    core.add(GenerateRequest("p", tuple(range(3, 20)), SamplingParams(8, 0.0)), prefill_only=True)
    computed = []
    while core.has_work:
        outputs = core.step()
        computed.append(core.stats.num_computed_tokens)
    (result,) = [o for o in outputs if isinstance(o, PrefillOutput)]
    assert computed == [17, 17]  # the second step only reads the first
    assert result.export is not None
    core.release_export("p")


def test_blocks_freed_while_a_step_runs_are_fenced_before_an_import() -> None:
    """An aborted request's step still runs on the device; its blocks must not be handed to a
    KV import (which NIXL writes at once) before that step is done."""
    prefill, decode = tiny(), tiny(async_scheduling=True, num_blocks=6)
    decode.add(GenerateRequest("busy", tuple(range(3, 20)), SamplingParams(4, 0.0)))
    decode.step()  # launched, not read: it writes 5 of the 6 blocks
    fences = []
    in_flight = decode._in_flight
    assert in_flight is not None
    in_flight.handle.fence = lambda: fences.append(True)  # type: ignore[method-assign]
    decode.abort("busy")

    request = GenerateRequest("imp", tuple(range(40, 52)), SamplingParams(4, 0.0))
    prefill.add(request, prefill_only=True)
    (result,) = run_until_idle(prefill)
    assert isinstance(result, PrefillOutput) and result.export is not None
    plan = decode.reserve_import(request, result.export)
    assert fences == [True]  # its blocks were among those the running step writes
    assert not in_flight.writes_any([BlockId(5)], decode.block_size)
    decode.abort("imp")
    prefill.release_export("imp")
    run_until_idle(decode)
    assert plan.block_ids and decode.is_idle_and_whole()
