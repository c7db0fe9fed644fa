"""SmolLM2-135M-Instruct on CPU against transformers, and the engine's contracts on a real model."""

from __future__ import annotations

from typing import Any

import pytest

from kvmesh.bench.reference import engine_logits, reference_logits, transformers_greedy
from kvmesh.engine import EngineConfig
from kvmesh.engine.torch_engine import TorchCore
from kvmesh.sampling import SamplingParams
from kvmesh.types import GenerateRequest, PrefillOutput
from tests.helpers import generate, generate_one_at_a_time, run_until_idle, tokens_by_request

GREEDY_32 = SamplingParams(max_tokens=32, temperature=0.0)


@pytest.fixture(autouse=True)
def _pool_is_whole_after_each_test(smollm2: TorchCore):  # type: ignore[no-untyped-def]
    yield
    assert smollm2.is_idle_and_whole()


@pytest.fixture(scope="module")
def one_at_a_time(smollm2: TorchCore, chat_prompts: list[list[int]]) -> list[list[int]]:
    return generate_one_at_a_time(smollm2, chat_prompts, GREEDY_32)


def test_greedy_tokens_match_transformers(
    hf_smollm2: Any, chat_prompts: list[list[int]], one_at_a_time: list[list[int]]
) -> None:
    theirs = [transformers_greedy(hf_smollm2, p, 32) for p in chat_prompts]
    matches = sum(a == b for a, b in zip(one_at_a_time, theirs, strict=True))
    assert matches >= 19, f"{matches}/20 prompts match"


def test_first_step_logits_match_transformers(
    smollm2: TorchCore, hf_smollm2: Any, chat_prompts: list[list[int]]
) -> None:
    for prompt in chat_prompts:
        ours = engine_logits(smollm2, prompt)[-1]
        theirs = reference_logits(smollm2, prompt, hf_smollm2)[-1]
        assert (ours - theirs).abs().max().item() < 1e-3


def test_batching_does_not_change_greedy_tokens(
    smollm2: TorchCore, chat_prompts: list[list[int]], one_at_a_time: list[list[int]]
) -> None:
    assert generate(smollm2, chat_prompts, GREEDY_32) == one_at_a_time


def _prompt_with_prefix(smollm2: TorchCore, prefix_len: int, question: str) -> list[int]:
    tokenizer = smollm2.tokenizer
    assert tokenizer is not None
    story = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(60))
    prefix = tokenizer.encode(story)[:prefix_len]
    return prefix + tokenizer.encode(f"\nQuestion: {question}\nAnswer:")


def test_a_shared_256_token_prefix_is_not_computed_again(smollm2: TorchCore) -> None:
    first = _prompt_with_prefix(smollm2, 256, "What animal jumps?")
    second = _prompt_with_prefix(smollm2, 256, "Which animal is lazy?")
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    generate(smollm2, [first], params)

    before = smollm2.stats.num_computed_tokens
    cached = generate(smollm2, [second], params)[0]
    computed = smollm2.stats.num_computed_tokens - before
    new_prompt_tokens = len(second) - 256
    assert computed == new_prompt_tokens + params.max_tokens - 1

    smollm2.pool.clear_cache()
    before = smollm2.stats.num_computed_tokens
    uncached = generate(smollm2, [second], params)[0]
    assert smollm2.stats.num_computed_tokens - before == len(second) + params.max_tokens - 1
    assert cached == uncached


@pytest.fixture(scope="module")
def decode_engine() -> TorchCore:
    return TorchCore(EngineConfig(model="smollm2", device="cpu"), show_progress=False)


def test_prefill_on_one_engine_decode_on_another(
    smollm2: TorchCore,
    decode_engine: TorchCore,
    chat_prompts: list[list[int]],
    one_at_a_time: list[list[int]],
) -> None:
    """The contract the NIXL transfer uses: blocks copied between engines give the same tokens."""
    prompts = chat_prompts[:6]
    expected = one_at_a_time[:6]
    for i, prompt in enumerate(prompts):
        request = GenerateRequest(f"disagg-{i}", tuple(prompt), GREEDY_32)
        smollm2.add(request, prefill_only=True)
        (result,) = run_until_idle(smollm2)
        assert isinstance(result, PrefillOutput)
        tokens = list(result.first.token_ids)
        if result.export is not None:
            plan = decode_engine.reserve_import(request, result.export)
            source = result.export.block_ids[plan.num_cached_blocks :]
            decode_engine.kv_cache.write_blocks(
                plan.blocks_to_fill, smollm2.kv_cache.read_blocks(source)
            )
            smollm2.release_export(request.request_id)
            decode_engine.start_import(request.request_id, tokens[0])
            tokens += tokens_by_request(run_until_idle(decode_engine)).get(request.request_id, [])
        assert tokens == expected[i], f"prompt {i}"
    # The decode engine computed only generated tokens, never a prompt token.
    generated = sum(len(t) for t in expected)
    assert decode_engine.stats.num_computed_tokens == generated - len(prompts)
    assert decode_engine.is_idle_and_whole()


def test_preemption_on_a_small_pool_keeps_results(chat_prompts: list[list[int]]) -> None:
    prompts = chat_prompts[:4]
    small = TorchCore(
        EngineConfig(model="smollm2", device="cpu", num_blocks=16), show_progress=False
    )
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    reference = TorchCore(EngineConfig(model="smollm2", device="cpu"), show_progress=False)
    assert generate(small, prompts, params) == generate(reference, prompts, params)
    assert small.stats.num_preemptions > 0
    assert small.is_idle_and_whole()
