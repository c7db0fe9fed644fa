"""Speculative decoding (n-gram drafts) on a tiny random-weight model: the same tokens as without
it, the limits it must respect, rollback without leaks, and the sampling rule's distribution."""

from __future__ import annotations

import argparse
import random

import pytest
import torch

from kvmesh import options
from kvmesh.engine import EngineConfig
from kvmesh.engine.registry import create_engine
from kvmesh.engine.sampling import SamplerRow, make_generator, processed_probs
from kvmesh.engine.torch_engine import TorchCore
from kvmesh.engine.verify import VerifyRow, verify
from kvmesh.errors import InvalidRequestError
from kvmesh.sampling import SamplingParams
from kvmesh.types import FinishReason, GenerateRequest, PrefillOutput, TokenOutput
from tests.helpers import generate, run_until_idle, tokens_by_request
from tests.helpers import tiny_core as tiny

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def spec(**overrides: object) -> TorchCore:
    return tiny(speculate="ngram", **overrides)


def repeating_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a short phrase: the tiny model's greedy output tends to repeat too."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [rng.randrange(3, 60) for _ in range(rng.randint(2, 7))]
        out.append(phrase * rng.randint(2, 5))
    return out


def random_prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(rng.randint(3, 30))] for _ in range(n)]


@pytest.fixture(scope="module")
def plain() -> TorchCore:
    return tiny()


def test_greedy_tokens_are_the_same_with_drafts_accepted_and_rejected(plain: TorchCore) -> None:
    prompts = repeating_prompts(10) + random_prompts(10)
    core = spec()
    plain_steps = plain.stats.num_steps
    expected = generate(plain, prompts, GREEDY)
    plain_steps = plain.stats.num_steps - plain_steps
    assert generate(core, prompts, GREEDY) == expected
    stats = core.stats
    assert stats.num_spec_accepted_tokens > 0  # some drafts right ...
    assert stats.num_spec_accepted_tokens < stats.num_spec_draft_tokens  # ... and some wrong
    assert stats.num_generated_tokens == 20 * GREEDY.max_tokens
    assert stats.num_steps < plain_steps  # accepted drafts saved steps
    assert core.is_idle_and_whole()


@pytest.mark.parametrize(
    "settings",
    [
        {"num_speculative_tokens": 1},
        {"num_speculative_tokens": 7, "ngram_max": 5, "ngram_min": 2},
        {"block_size": 16, "num_blocks": 32},
        {"max_num_batched_tokens": 9},  # drafts squeezed by decoders and prefill chunks
        {"enable_prefix_cache": False},
    ],
)
def test_greedy_tokens_are_the_same_whatever_the_settings(settings: dict[str, object]) -> None:
    prompts = repeating_prompts(6, seed=3) + random_prompts(4, seed=4)
    base = {k: v for k, v in settings.items() if k.startswith(("block", "num_blocks", "max_"))}
    expected = generate(tiny(**base), prompts, GREEDY)
    core = spec(**settings)
    assert generate(core, prompts, GREEDY) == expected
    assert core.is_idle_and_whole()


def test_drafts_respect_max_tokens_and_the_context_limit(plain: TorchCore) -> None:
    prompt = [5, 6, 7, 8] * 6
    core = spec(num_speculative_tokens=8)
    for max_tokens in (1, 2, 3, 5):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        (tokens,) = generate(core, [prompt], params, prefix=f"m{max_tokens}")
        assert tokens == generate(plain, [prompt], params, prefix=f"m{max_tokens}")[0]
        assert len(tokens) == max_tokens
    # Requests never ask past the context, so its limit coincides with max_tokens here.
    prompt = repeating_prompts(1)[0]  # the tiny model's output soon repeats itself
    short = spec(num_speculative_tokens=8, max_model_len=len(prompt) + 16)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    short.add(GenerateRequest("long", tuple(prompt), params))
    outputs = run_until_idle(short)
    assert tokens_by_request(outputs)["long"] == generate(plain, [prompt], params)[0]
    assert outputs[-1].finish_reason is FinishReason.LENGTH  # type: ignore[union-attr]
    assert short.stats.num_spec_accepted_tokens > 0
    assert short.is_idle_and_whole() and core.is_idle_and_whole()


def test_a_stop_token_inside_accepted_drafts_ends_the_output_there(plain: TorchCore) -> None:
    prompts = repeating_prompts(8, seed=5)
    expected = generate(plain, prompts, GREEDY)
    for i, (prompt, full) in enumerate(zip(prompts, expected, strict=True)):
        stop = full[len(full) // 2]  # the first occurrence of it ends the request
        params = SamplingParams(
            max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=(stop,)
        )
        core = spec()
        core.add(GenerateRequest(f"s{i}", tuple(prompt), params))
        outputs = [o for o in run_until_idle(core) if isinstance(o, TokenOutput)]
        tokens = [t for o in outputs for t in o.token_ids]
        assert tokens == full[: full.index(stop) + 1]
        assert outputs[-1].finish_reason is FinishReason.STOP and outputs[-1].stop_reason == stop
        assert core.is_idle_and_whole()


def test_logprobs_are_those_of_one_token_at_a_time(plain: TorchCore) -> None:
    params = SamplingParams(
        max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3
    )
    prompts = repeating_prompts(4, seed=6)

    def run(core: TorchCore) -> dict[str, list[tuple[int, float, list[int]]]]:
        for i, p in enumerate(prompts):
            core.add(GenerateRequest(f"lp{i}", tuple(p), params))
        got: dict[str, list[tuple[int, float, list[int]]]] = {}
        for o in run_until_idle(core):
            assert isinstance(o, TokenOutput) and len(o.logprobs) == len(o.token_ids)
            got.setdefault(o.request_id, []).extend(
                (lp.token_id, lp.logprob, [t for t, _ in lp.top]) for lp in o.logprobs
            )
        return got

    core = spec()
    ours, theirs = run(core), run(plain)
    assert core.stats.num_spec_accepted_tokens > 0
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert [(t, top) for t, _, top in ours[key]] == [(t, top) for t, _, top in theirs[key]]
        assert [lp for _, lp, _ in ours[key]] == pytest.approx(
            [lp for _, lp, _ in theirs[key]], abs=1e-4
        )


def test_aborts_between_verify_steps_leave_every_block_in_the_pool() -> None:
    core = spec()
    prompts = repeating_prompts(8, seed=7)
    for i, p in enumerate(prompts):
        core.add(GenerateRequest(f"a{i}", tuple(p), GREEDY))
    for _ in range(4):
        core.step()
    assert core.stats.num_spec_verifications > 0
    for i in range(0, 8, 2):
        out = core.abort(f"a{i}")
        assert out is not None and out.finish_reason is FinishReason.ABORT
    core.step()
    for i in range(1, 8, 2):
        core.abort(f"a{i}")
    assert core.is_idle_and_whole()


def test_preemption_with_drafts_keeps_tokens_and_blocks() -> None:
    prompts = repeating_prompts(8, seed=8)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    expected = generate(tiny(), prompts, params)
    core = spec(num_blocks=30)  # too small for all eight at once
    assert generate(core, prompts, params) == expected
    assert core.stats.num_preemptions > 0
    assert core.stats.num_spec_accepted_tokens > 0
    assert core.is_idle_and_whole()


def test_cached_blocks_hold_accepted_tokens_only(plain: TorchCore) -> None:
    """A prompt that extends an earlier request's prompt and output hits the blocks that
    request cached; if a rejected draft's K/V were in them, the tokens would differ."""
    core = spec()
    prompts = repeating_prompts(6, seed=9) + random_prompts(4, seed=10)
    outputs = generate(core, prompts, GREEDY, prefix="first")
    follow_ups = [p + o + [11, 12] for p, o in zip(prompts, outputs, strict=True)]
    hits = core.stats.num_prefix_hit_tokens
    assert generate(core, follow_ups, GREEDY, prefix="again") == generate(
        plain, follow_ups, GREEDY, prefix="again"
    )
    assert core.stats.num_prefix_hit_tokens > hits
    assert core.is_idle_and_whole()


def test_imported_sequences_decode_with_drafts(plain: TorchCore) -> None:
    prefill, decode = tiny(), spec()
    prompt = [9, 8, 7, 6, 5] * 4
    expected = generate(plain, [prompt], GREEDY, prefix="imp")[0]
    request = GenerateRequest("imp", tuple(prompt), GREEDY)
    prefill.add(request, prefill_only=True)
    (result,) = run_until_idle(prefill)
    assert isinstance(result, PrefillOutput) and result.export is not None
    plan = decode.reserve_import(request, result.export)
    source = result.export.block_ids[plan.num_cached_blocks :]
    decode.kv_cache.write_blocks(plan.blocks_to_fill, prefill.kv_cache.read_blocks(source))
    prefill.release_export("imp")
    assert decode.start_import("imp", result.first.token_ids[0]) is None
    tokens = result.first.token_ids + tokens_by_request(run_until_idle(decode))["imp"]
    assert tokens == expected
    assert decode.stats.num_spec_verifications > 0
    assert decode.is_idle_and_whole() and prefill.is_idle_and_whole()


def test_prefill_only_requests_are_not_drafted() -> None:
    core = spec()
    core.add(GenerateRequest("p", tuple([1, 2, 3] * 5), GREEDY), prefill_only=True)
    (result,) = run_until_idle(core)
    assert isinstance(result, PrefillOutput) and result.export is not None
    assert core.stats.num_spec_verifications == 0
    core.release_export("p")
    assert core.is_idle_and_whole()


# -- sampling ------------------------------------------------------------------------------------


def test_seeded_sampling_with_drafts_is_reproducible() -> None:
    # Cold enough for the tiny model's drafts to be accepted, still through the sampling rule.
    params = SamplingParams(max_tokens=24, temperature=0.03, seed=1234, ignore_eos=True)
    prompts = repeating_prompts(6, seed=11)
    first, second = spec(), spec()
    a = generate(first, prompts, params)
    # Batch composition does not matter either: one at a time gives the same tokens.
    b = [generate(second, [p], params, prefix=f"one{i}")[0] for i, p in enumerate(prompts)]
    assert a == b
    assert first.stats.num_spec_accepted_tokens > 0
    assert first.is_idle_and_whole() and second.is_idle_and_whole()


def _empirical(
    logits: torch.Tensor, drafts: tuple[int, ...], params: SamplingParams, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """How often each token comes first and second out of `verify` over n seeded runs
    (second: only runs that accepted the first draft)."""
    vocab = logits.shape[-1]
    first = torch.zeros(vocab)
    second = torch.zeros(vocab)
    generator = make_generator(params, logits.device)
    row = SamplerRow(params, generator)
    for _ in range(n):
        (emitted,) = verify(logits, [VerifyRow(row, 0, drafts)])
        first[emitted[0]] += 1
        if len(emitted) > 1 and emitted[0] == drafts[0]:
            second[emitted[1]] += 1
    return first / n, second / max(second.sum().item(), 1)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, seed=7),
        SamplingParams(temperature=0.7, top_k=5, seed=8),
        SamplingParams(temperature=1.3, top_p=0.8, seed=9),
    ],
    ids=["plain", "top-k", "top-p"],
)
@pytest.mark.parametrize("draft_rank", [0, 3, -1], ids=["likely", "middling", "unlikely"])
def test_rejection_sampling_keeps_the_target_distribution(
    params: SamplingParams, draft_rank: int
) -> None:
    """Whatever the draft, each emitted token is distributed as the processed target p: the
    total-variation distance stays within what 8000 samples allow (seeded: deterministic)."""
    torch.manual_seed(0)
    vocab = 12
    logits = torch.randn(3, vocab) * 2
    order = processed_probs(logits[0], params).argsort(descending=True).tolist()
    second_order = processed_probs(logits[1], params).argsort(descending=True).tolist()
    drafts = (order[draft_rank], second_order[0])
    n = 8000
    first, second = _empirical(logits, drafts, params, n)
    p0 = processed_probs(logits[0], params)
    p1 = processed_probs(logits[1], params)
    assert 0.5 * (first - p0).abs().sum().item() < 0.03
    if second.sum() > 0 and p0[drafts[0]] > 0.2:  # enough runs reached the second row
        assert 0.5 * (second - p1).abs().sum().item() < 0.06
    # Tokens the processing removed (top-k, top-p) never come out.
    assert torch.all(first[p0 == 0] == 0)


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"speculate": "eagle"}, "speculate must be one of ngram"),
        (
            {"speculate": "ngram", "num_speculative_tokens": 0},
            "num_speculative_tokens must be >= 1",
        ),
        ({"speculate": "ngram", "ngram_min": 0}, "ngram_min must be >= 1"),
        (
            {"speculate": "ngram", "ngram_max": 2, "ngram_min": 3},
            r"ngram_max \(2\) must be >= ngram_min \(3\)",
        ),
        ({"speculate": "ngram", "async_scheduling": True}, "synchronous scheduling"),
    ],
)
def test_bad_speculation_settings_are_refused_clearly(
    settings: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        EngineConfig(**settings).validate()  # type: ignore[arg-type]


def test_speculation_turns_async_scheduling_off_and_an_engine_that_cannot_verify_refuses() -> None:
    assert not spec(async_scheduling=None).async_scheduling
    with pytest.raises(InvalidRequestError, match="cannot verify draft tokens"):
        create_engine(EngineConfig(engine="sim", speculate="ngram"))


def test_worker_options_carry_the_speculation_settings() -> None:
    parser = argparse.ArgumentParser()
    options.add_engine_options(parser)
    args = parser.parse_args(
        [
            "--speculate",
            "ngram",
            "--num-speculative-tokens",
            "6",
            "--ngram-max",
            "4",
            "--ngram-min",
            "2",
        ]
    )
    config = options.engine_config(args)
    assert (
        config.speculate,
        config.num_speculative_tokens,
        config.ngram_max,
        config.ngram_min,
    ) == (
        "ngram",
        6,
        4,
        2,
    )
    default = options.engine_config(parser.parse_args([]))
    assert default.speculate is None and default == EngineConfig()
