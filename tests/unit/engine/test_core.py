"""The engine core on a tiny random-weight model: scheduling, caching, KV moves, errors.

Every test runs twice: with synchronous steps, and with async scheduling (each step launched
before the previous one is read, as on a GPU), which must not change a single token.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from kvmesh import models
from kvmesh.engine import EngineConfig, faults
from kvmesh.engine.sequence import SeqKind
from kvmesh.engine.torch_engine import TorchCore
from kvmesh.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    UnknownRequestError,
)
from kvmesh.kv.errors import LayoutMismatchError
from kvmesh.kv.events import BlockRemoved, BlockStored
from kvmesh.sampling import SamplingParams
from kvmesh.types import FinishReason, GenerateRequest, PrefillOutput, TokenOutput
from tests.helpers import (
    generate,
    generate_one_at_a_time,
    run_until_idle,
    tiny_core,
    tokens_by_request,
)

NO_EOS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


PRESETS = Path(models.__file__).parent / "engine" / "presets"


def tiny_config_path(name: str, tmp_path: Path) -> Path:
    """A tiny preset, or a variant of one written to tmp_path."""
    if name == "llama3-rope":
        config = json.loads((PRESETS / "llama-tiny.json").read_text())
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        path = tmp_path / "llama3-rope.json"
        path.write_text(json.dumps(config))
        return path
    return PRESETS / f"{name}.json"


_ASYNC = {"on": False}  # set per module run by the `scheduling` fixture


def tiny(**overrides: object) -> TorchCore:
    return tiny_core(**{"async_scheduling": _ASYNC["on"], **overrides})


def prompts(n: int, *, seed: int = 0, low: int = 3, high: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(rng.randint(low, high))] for _ in range(n)]


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"], autouse=True)
def scheduling(request: pytest.FixtureRequest) -> bool:
    _ASYNC["on"] = request.param
    return bool(request.param)


@pytest.fixture(scope="module")
def core(scheduling: bool) -> TorchCore:
    core = tiny()
    assert core.async_scheduling == scheduling
    return core


@pytest.fixture(autouse=True)
def _pool_is_whole_after_each_test(core: TorchCore):  # type: ignore[no-untyped-def]
    yield
    assert core.is_idle_and_whole(), "a test left requests, pins or referenced blocks behind"


def test_batching_does_not_change_greedy_tokens(core: TorchCore) -> None:
    batch = prompts(8)
    together = generate(core, batch, NO_EOS)
    alone = generate_one_at_a_time(core, batch, NO_EOS)
    assert together == alone
    assert all(len(t) == 12 for t in together)


def test_chunked_prefill_gives_the_same_tokens() -> None:
    batch = prompts(4, low=20, high=40)
    whole = generate(tiny(max_num_batched_tokens=256), batch, NO_EOS)
    chunked_core = tiny(max_num_batched_tokens=7)
    step_sizes: list[int] = []
    run = chunked_core.runner.launch  # what both sync and async steps go through

    def recording_run(chunks):  # type: ignore[no-untyped-def]
        step_sizes.append(sum(c.num_tokens for c in chunks))
        return run(chunks)

    chunked_core.runner.launch = recording_run  # type: ignore[method-assign]
    assert generate(chunked_core, batch, NO_EOS) == whole
    assert max(step_sizes) == 7
    assert step_sizes.count(7) >= sum(len(p) for p in batch) // 7 - 1


def test_prefix_cache_computes_only_new_tokens(core: TorchCore) -> None:
    shared = prompts(1, seed=5, low=32, high=32)[0]  # 8 full blocks of 4
    first = shared + [7, 8, 9]
    second = shared + [11, 12, 13, 14, 15]
    generate(core, [first], NO_EOS)
    before = core.stats.num_computed_tokens
    cached = generate(core, [second], NO_EOS)[0]
    computed = core.stats.num_computed_tokens - before
    assert computed == len(second) - len(shared) + (NO_EOS.max_tokens - 1)
    core.pool.clear_cache()
    assert generate(core, [second], NO_EOS)[0] == cached


def test_prompts_sharing_a_prefix_submitted_together_compute_it_once(core: TorchCore) -> None:
    shared = prompts(1, seed=7, low=32, high=32)[0]  # 8 full blocks of 4
    batch = [shared + [7, 8, 9], shared + [11, 12, 13, 14, 15], shared + [21, 22]]
    expected = generate_one_at_a_time(core, batch, NO_EOS)
    core.pool.clear_cache()
    before = core.stats.num_computed_tokens
    assert generate(core, batch, NO_EOS) == expected
    computed = core.stats.num_computed_tokens - before
    uncached = len(shared) + sum(len(p) - len(shared) for p in batch)
    assert computed == uncached + len(batch) * (NO_EOS.max_tokens - 1)
    assert core.scheduler.num_deferred >= 2


def test_a_fully_cached_prompt_still_computes_its_last_token(core: TorchCore) -> None:
    prompt = prompts(1, seed=6, low=16, high=16)[0]  # exactly 4 blocks
    expected = generate(core, [prompt], NO_EOS)[0]
    before = core.stats.num_computed_tokens
    assert generate(core, [prompt], NO_EOS)[0] == expected
    # the last block is recomputed: its last token's logits give the first output token
    assert core.stats.num_computed_tokens - before == 4 + NO_EOS.max_tokens - 1


def test_preemption_recomputes_and_keeps_results() -> None:
    batch = prompts(4, seed=3, low=10, high=10)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    expected = generate(tiny(), batch, params)
    small = tiny(num_blocks=16)  # 64 token slots; the four requests need 4 x 30
    assert generate(small, batch, params) == expected
    assert small.stats.num_preemptions > 0
    assert small.is_idle_and_whole()


def test_random_load_on_a_small_pool_always_finishes() -> None:
    """No deadlock: every request finishes under heavy preemption; the pool comes back whole."""
    rng = random.Random(7)
    small = tiny(num_blocks=24, max_num_batched_tokens=16, max_num_seqs=6)
    for i, prompt in enumerate(prompts(30, seed=11, low=1, high=40)):
        max_tokens = rng.randint(1, 96 - len(prompt))
        small.add(
            GenerateRequest(
                f"r{i}", tuple(prompt), SamplingParams(max_tokens, 0.0, ignore_eos=True)
            )
        )
    outputs = run_until_idle(small, max_steps=20_000)
    finished = {o.request_id for o in outputs if isinstance(o, TokenOutput) and o.finished}
    assert finished == {f"r{i}" for i in range(30)}
    assert small.stats.num_preemptions > 0
    assert small.is_idle_and_whole()


def test_prefill_export_then_import_on_another_engine(core: TorchCore) -> None:
    decode = tiny()
    prompt = prompts(1, seed=9, low=22, high=22)[0]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = generate(core, [prompt], params)[0]

    tokens, moved = _disaggregated(core, decode, "d1", prompt, params)
    assert tokens == expected
    assert moved == 6  # ceil(22 / 4): nothing cached on the decode side yet

    # The decode engine now caches the prompt's full blocks: only the partial one moves.
    tokens, moved = _disaggregated(core, decode, "d2", prompt, params)
    assert tokens == expected
    assert moved == 1
    assert decode.is_idle_and_whole()


def _disaggregated(
    prefill: TorchCore,
    decode: TorchCore,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
) -> tuple[list[int], int]:
    request = GenerateRequest(request_id, tuple(prompt), params)
    prefill.add(request, prefill_only=True)
    (result,) = run_until_idle(prefill)
    assert isinstance(result, PrefillOutput) and result.export is not None
    plan = decode.reserve_import(request, result.export)
    source = result.export.block_ids[plan.num_cached_blocks :]
    decode.kv_cache.write_blocks(plan.blocks_to_fill, prefill.kv_cache.read_blocks(source))
    prefill.release_export(request_id)
    decode.start_import(request_id, result.first.token_ids[0])
    rest = tokens_by_request(run_until_idle(decode))[request_id]
    return result.first.token_ids + rest, len(plan.blocks_to_fill)


def test_prefill_that_finishes_at_once_exports_nothing(core: TorchCore) -> None:
    core.add(GenerateRequest("p1", (5, 6, 7), SamplingParams(max_tokens=1)), prefill_only=True)
    (result,) = run_until_idle(core)
    assert isinstance(result, PrefillOutput)
    assert result.export is None
    assert result.first.finish_reason is FinishReason.LENGTH


def test_import_rejects_a_mismatched_export(core: TorchCore) -> None:
    other = tiny(block_size=8)
    request = GenerateRequest("m1", (5, 6, 7, 8, 9), NO_EOS)
    other.add(request, prefill_only=True)
    (result,) = run_until_idle(other)
    assert isinstance(result, PrefillOutput) and result.export is not None
    # Another block size converts on import: the plan is in this engine's blocks.
    plan = core.reserve_import(request, result.export)
    assert (len(plan.block_ids), plan.block_size) == (2, 4)
    core.abort("m1")
    layers = core.kv_cache.layout.num_layers
    alien = dataclasses.replace(
        result.export,
        layout_fingerprint=result.export.layout_fingerprint.replace(f":L{layers}:", ":L99:"),
    )
    with pytest.raises(LayoutMismatchError, match=f"layers 99 vs {layers}"):
        core.reserve_import(request, alien)
    other.release_export("m1")
    with pytest.raises(UnknownRequestError):
        other.release_export("m1")
    with pytest.raises(UnknownRequestError):
        core.start_import("never-reserved", 5)


def test_abort_frees_waiting_running_exported_and_reserved(core: TorchCore) -> None:
    core.add(GenerateRequest("a-run", tuple(range(3, 20)), NO_EOS))
    core.step()
    core.add(GenerateRequest("a-wait", tuple(range(3, 20)), NO_EOS))
    out = core.abort("a-run")
    assert out is not None and out.finish_reason is FinishReason.ABORT
    assert core.abort("a-wait") is not None
    assert core.abort("no-such-request") is None

    request = GenerateRequest("a-exp", tuple(range(3, 20)), NO_EOS)
    core.add(request, prefill_only=True)
    (result,) = run_until_idle(core)
    assert isinstance(result, PrefillOutput) and result.export is not None
    core.reserve_import(GenerateRequest("a-imp", request.prompt_token_ids, NO_EOS), result.export)
    assert core.load().num_blocks_pinned > 0
    assert core.abort("a-exp") is None and core.abort("a-imp") is None
    assert core.load().num_blocks_pinned == 0


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ((), NO_EOS, "prompt is empty"),
        ((1, 2, 5000), NO_EOS, "outside the vocabulary"),
        ((1, -1), NO_EOS, "outside the vocabulary"),
        (tuple(range(3, 3 + 512)), NO_EOS, "context holds 512"),
        ((1, 2), SamplingParams(max_tokens=0), "max_tokens must be at least 1"),
        ((1, 2), SamplingParams(max_tokens=511), "exceeds the context"),
        ((1, 2), SamplingParams(temperature=-1.0), "temperature must be >= 0"),
        ((1, 2), SamplingParams(temperature=float("nan")), "temperature must be >= 0"),
        ((1, 2), SamplingParams(top_p=0.0), r"top_p must be in \(0, 1\]"),
        ((1, 2), SamplingParams(top_p=1.5), r"top_p must be in \(0, 1\]"),
        ((1, 2), SamplingParams(top_k=-1), "top_k must be >= 0"),
        ((1, 2), SamplingParams(top_logprobs=21), "top_logprobs"),
        ((1, 2), SamplingParams(stop_token_ids=(99999,)), "stop_token_ids"),
        ((1, 2), SamplingParams(stop=("x",)), "need a tokenizer"),
    ],
)
def test_bad_input_is_refused_and_the_engine_keeps_serving(
    core: TorchCore, prompt: tuple[int, ...], params: SamplingParams, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        core.add(GenerateRequest("bad", prompt, params))
    assert generate(core, [[5, 6, 7]], NO_EOS)[0]


def test_duplicate_request_ids_are_refused(core: TorchCore) -> None:
    core.add(GenerateRequest("dup", (5, 6), NO_EOS))
    with pytest.raises(InvalidRequestError, match="already in use"):
        core.add(GenerateRequest("dup", (5, 6), NO_EOS))
    run_until_idle(core)


def test_missing_model_path_is_a_typed_error() -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        TorchCore(EngineConfig(model="/no/such/model"), show_progress=False)
    with pytest.raises(ModelNotFoundError, match="no dummy preset"):
        TorchCore(EngineConfig(model="dummy:no-such-preset"), show_progress=False)


def test_finish_reasons(core: TorchCore) -> None:
    prompt = [5, 6, 7, 8]
    free_run = generate(core, [prompt], NO_EOS)[0]
    stop_at = free_run[3]
    stopped = generate(
        core, [prompt], SamplingParams(12, 0.0, stop_token_ids=(stop_at,), ignore_eos=True)
    )
    assert stopped[0] == free_run[: free_run.index(stop_at) + 1]

    core.add(
        GenerateRequest(
            "len", tuple(prompt), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        )
    )
    final = [o for o in run_until_idle(core) if isinstance(o, TokenOutput)][-1]
    assert final.finish_reason is FinishReason.LENGTH
    assert final.num_output_tokens == 3


def test_eos_stops_unless_ignored(core: TorchCore) -> None:
    prompt = [5, 6, 7, 8]
    first = generate(core, [prompt], NO_EOS)[0][0]
    eos_core = tiny(num_blocks=32)
    eos_core.eos_token_ids = frozenset({first})
    assert generate(eos_core, [prompt], SamplingParams(8, 0.0))[0] == [first]
    assert len(generate(eos_core, [prompt], SamplingParams(8, 0.0, ignore_eos=True))[0]) == 8


def test_seeded_sampling_is_reproducible_whatever_the_batch(core: TorchCore) -> None:
    sampled = SamplingParams(
        max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True
    )
    prompt = [9, 10, 11, 12, 13]
    alone = generate(core, [prompt], sampled)[0]
    crowd = generate(core, [prompt, *prompts(5, seed=2)], sampled)[0]
    assert alone == crowd
    other_seed = SamplingParams(16, 1.0, 0.9, 50, seed=99, ignore_eos=True)
    assert generate(core, [prompt], other_seed)[0] != alone


def test_logprobs(core: TorchCore) -> None:
    params = SamplingParams(
        max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3
    )
    core.add(GenerateRequest("lp", (5, 6, 7), params))
    outs = [o for o in run_until_idle(core) if isinstance(o, TokenOutput)]
    for out in outs:
        (lp,) = out.logprobs
        assert lp.token_id == out.token_ids[0]
        assert lp.logprob <= 0.0
        assert len(lp.top) == 3
        assert lp.top[0] == (lp.token_id, pytest.approx(lp.logprob))
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_kv_events_report_what_the_cache_gains_and_loses() -> None:
    small = tiny(num_blocks=8)
    generate(
        small, [list(range(3, 20))], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    )
    batch = small.kv_events.read_after(0)
    stored = [e for e in batch.events if isinstance(e, BlockStored)]
    assert sum(len(e.block_hashes) for e in stored) == (17 + 2) // 4
    ids = [e.event_id for e in batch.events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    generate(
        small,
        [list(range(100, 128))],
        SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
    )
    later = small.kv_events.read_after(batch.last_event_id)
    assert any(isinstance(e, BlockRemoved) for e in later.events)


def test_load_snapshot_counts_requests_and_blocks(core: TorchCore) -> None:
    core.add(GenerateRequest("l1", tuple(range(300, 310)), NO_EOS))  # nothing cached yet
    core.add(GenerateRequest("l2", tuple(range(400, 406)), NO_EOS))
    load = core.load()
    assert (load.num_running, load.num_waiting) == (0, 2)
    assert load.num_tokens_in_flight == 16
    assert load.num_prefill_tokens_pending == 16
    core.step()
    load = core.load()
    assert (load.num_running, load.num_waiting) == (2, 0)
    assert load.num_blocks_used == 3 + 2
    assert load.num_blocks_total == 128
    run_until_idle(core)


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny", "llama3-rope"])
def test_logits_match_transformers_with_the_same_weights(preset: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kvmesh.bench.reference import reference_logits

    spec = f"dummy:{tiny_config_path(preset, tmp_path)}"
    engine = TorchCore(
        EngineConfig(model=spec, device="cpu", block_size=4, num_blocks=64), show_progress=False
    )
    prompt = list(range(5, 45))
    ours = _prompt_logits(engine, prompt)
    theirs = reference_logits(engine, prompt)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()


def _prompt_logits(core: TorchCore, prompt: list[int]) -> torch.Tensor:
    from kvmesh.bench.reference import engine_logits

    return engine_logits(core, prompt)


def test_a_cache_salt_isolates_the_prefix_cache(core: TorchCore) -> None:
    """Tenants' requests hit only blocks cached under their own salt (vLLM's cache_salt)."""
    prompt = tuple(prompts(1, seed=12, low=32, high=32)[0])  # 8 full blocks of 4

    def cached(request_id: str, salt: str) -> int:
        core.add(GenerateRequest(request_id, prompt, NO_EOS, cache_salt=salt))
        final = [o for o in run_until_idle(core) if isinstance(o, TokenOutput)][-1]
        return final.num_cached_tokens

    assert cached("a1", "tenant-a") == 0
    assert cached("a2", "tenant-a") == 28  # all but the last block, whose last token runs
    assert cached("b1", "tenant-b") == 0
    assert cached("plain", "") == 0


def test_a_full_waiting_queue_refuses_new_requests() -> None:
    small = tiny(max_num_waiting=2)
    small.add(GenerateRequest("w1", (5, 6), NO_EOS))
    small.add(GenerateRequest("w2", (5, 6), NO_EOS))
    with pytest.raises(OverloadedError, match="queue is full"):
        small.add(GenerateRequest("w3", (5, 6), NO_EOS))
    run_until_idle(small)
    small.add(GenerateRequest("w3", (5, 6), NO_EOS))  # room again
    run_until_idle(small)
    assert small.is_idle_and_whole()


@pytest.mark.parametrize("position", [0, 3, 5], ids=["oldest", "middle", "newest"])
def test_a_request_that_fails_the_step_fails_alone_and_its_batch_goes_on(
    core: TorchCore, position: int
) -> None:
    """A planted fault (the test-only hook a worker enables by its environment): the step is
    retried without its newest requests until the culprit is alone; only it fails, and the
    others produce the tokens they produce without it."""
    batch = prompts(6, seed=3)
    poisoned = [*batch[position][:2], 1, *batch[position][2:]]  # prompts hold no token 1
    innocent = [p for i, p in enumerate(batch) if i != position]
    expected = generate(core, innocent, NO_EOS, prefix="clean")
    core._check_step = faults.poison(1)
    try:
        ids = [f"req-{i}" for i in range(6)]
        for i, request_id in enumerate(ids):
            prompt = poisoned if i == position else batch[i]
            core.add(GenerateRequest(request_id, tuple(prompt), NO_EOS))
        tokens = tokens_by_request(run_until_idle(core))
        failures = core.take_failures()
    finally:
        core._check_step = None
    assert [request_id for request_id, _ in failures] == [ids[position]]
    assert isinstance(failures[0][1], faults.PoisonedStepError)
    assert [tokens[request_id] for request_id in ids if request_id != ids[position]] == expected
    assert ids[position] not in tokens
    assert core.stats.num_requests_failed >= 1


def test_exports_in_another_dtype_leave_through_a_pool_of_their_own() -> None:
    """--transfer-dtype fp8_e4m3: the export names FP8 blocks of the export pool, the cache's
    blocks are not pinned, and releasing the export gives the pool its blocks back."""
    exporter = tiny(transfer_dtype="fp8_e4m3", block_size=4)
    assert exporter.exports is not None
    request = GenerateRequest("x1", tuple(range(5, 15)), NO_EOS)
    exporter.add(request, prefill_only=True)
    (result,) = run_until_idle(exporter)
    assert isinstance(result, PrefillOutput) and result.export is not None
    export = result.export
    assert export.layout_fingerprint.endswith(":B4:e4m3")
    assert export.layout_fingerprint == exporter.exports.layout_fingerprint
    assert len(export.block_ids) == 3 and exporter.exports.num_free_blocks == 128 - 3
    assert exporter.load().num_blocks_pinned == 0
    # The FP8 blocks hold the cache's KV to e4m3 precision (the last block's tail is zero).
    seq = exporter._new_sequence(request, SeqKind.GENERATE)
    seq.extend_hashes(4)
    hits = exporter.pool.lookup(seq.block_hashes)  # the prompt's two full blocks, still cached
    assert len(hits) == 2
    original = exporter.kv_cache.read_values(hits)
    sent = exporter.exports.cache.read_values(list(export.block_ids[: len(hits)]))
    assert torch.allclose(sent, original, rtol=0.07, atol=0.07 * original.abs().max().item())
    exporter.release_export("x1")
    assert exporter.exports.is_whole() and exporter.is_idle_and_whole()


def test_an_export_that_finds_the_pool_full_fails_alone() -> None:
    exporter = tiny(transfer_dtype="fp8_e4m3", block_size=4, num_blocks=4)
    assert exporter.exports is not None
    short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    exporter.add(GenerateRequest("fits", tuple(range(5, 17)), short), prefill_only=True)
    run_until_idle(exporter)
    exporter.add(GenerateRequest("full", (5, 6, 7, 8, 9, 10, 12), short), prefill_only=True)
    assert run_until_idle(exporter) == []
    ((failed, error),) = exporter.take_failures()
    assert failed == "full" and "no room to export" in str(error)
    exporter.release_export("fits")
    assert exporter.is_idle_and_whole()


def test_an_fp8_cache_serves_and_hashes_apart() -> None:
    fp8 = tiny(kv_dtype="fp8_e4m3")
    assert fp8.info.kv_dtype == "fp8_e4m3"
    assert fp8.info.layout_fingerprint.endswith(":B4:e4m3")
    plain = tiny()
    request = GenerateRequest("h", tuple(range(5, 13)), NO_EOS)
    assert (
        fp8._new_sequence(request, SeqKind.GENERATE).root
        != plain._new_sequence(request, SeqKind.GENERATE).root
    )
    (tokens,) = generate(fp8, [list(range(5, 25))], NO_EOS)
    assert len(tokens) == NO_EOS.max_tokens
    assert fp8.is_idle_and_whole()
