"""N-gram speculative decoding on SmolLM2-135M-Instruct (CPU): greedy tokens and text exactly as
without it, on prompts whose answers copy their input (drafts accepted) and on chat prompts
(drafts mostly rejected)."""

from __future__ import annotations

import pytest

from kvmesh.bench.prompts import CHAT_PROMPTS
from kvmesh.engine import EngineConfig
from kvmesh.engine.torch_engine import TorchCore
from kvmesh.sampling import SamplingParams
from kvmesh.types import GenerateRequest, TokenOutput
from tests.helpers import generate, run_until_idle

GREEDY_40 = SamplingParams(max_tokens=40, temperature=0.0)

COPY_PROMPTS = (
    "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog.",
    "Copy this list: apples, oranges, bananas, pears, grapes, plums.",
    "Rewrite this code with the function renamed to add_numbers:\n\ndef add(a, b):\n"
    "    return a + b",
    "Say 'hello world' five times.",
    "Write the numbers from 1 to 20 separated by commas.",
    "Repeat after me: to be or not to be, that is the question.",
    "Correct the spelling: 'I recieved the pakage yesterday and it was brokn.'",
    "Convert to uppercase: the cat sat on the mat.",
    "Count from ten down to one, in words.",
    "Write the alphabet in capital letters, separated by spaces.",
)


@pytest.fixture(scope="module")
def speculative() -> TorchCore:
    config = EngineConfig(model="smollm2", device="cpu", num_blocks=512, speculate="ngram")
    return TorchCore(config, show_progress=False)


@pytest.fixture(scope="module")
def prompts(smollm2: TorchCore) -> list[list[int]]:
    tokenizer = smollm2.tokenizer
    assert tokenizer is not None
    texts = COPY_PROMPTS + CHAT_PROMPTS[:10]
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]


def test_greedy_tokens_are_identical_with_speculation(
    smollm2: TorchCore, speculative: TorchCore, prompts: list[list[int]]
) -> None:
    assert len(prompts) == 20
    expected = generate(smollm2, prompts, GREEDY_40, prefix="plain")
    ours = generate(speculative, prompts, GREEDY_40, prefix="spec")
    for i, (a, b) in enumerate(zip(ours, expected, strict=True)):
        assert a == b, f"prompt {i} differs"
    stats = speculative.stats
    assert stats.num_spec_accepted_tokens > 0.15 * stats.num_spec_draft_tokens
    assert stats.num_spec_accepted_tokens < stats.num_spec_draft_tokens
    # Copying answers emit well over one token per verification.
    assert stats.spec_tokens_per_verification > 1.5
    assert speculative.is_idle_and_whole() and smollm2.is_idle_and_whole()


def _text(core: TorchCore, request_id: str, prompt: list[int], params: SamplingParams) -> str:
    core.add(GenerateRequest(request_id, tuple(prompt), params))
    outputs = [o for o in run_until_idle(core) if isinstance(o, TokenOutput)]
    assert outputs[-1].finished
    return "".join(o.text for o in outputs)


def test_stop_strings_and_text_are_the_same_with_speculation(
    smollm2: TorchCore, speculative: TorchCore, prompts: list[list[int]]
) -> None:
    prompt = prompts[0]  # "Repeat this sentence exactly: ..."
    full = _text(smollm2, "text-plain", prompt, GREEDY_40)
    assert "lazy" in full
    assert _text(speculative, "text-spec", prompt, GREEDY_40) == full
    stop = SamplingParams(max_tokens=40, temperature=0.0, stop=("lazy",))
    cut = _text(smollm2, "stop-plain", prompt, stop)
    assert cut == full[: full.index("lazy")]
    assert _text(speculative, "stop-spec", prompt, stop) == cut
    assert speculative.is_idle_and_whole()
