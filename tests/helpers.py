"""Drive an TorchCore synchronously in tests."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from kvmesh.engine.config import EngineConfig
from kvmesh.engine.core import StepOutput
from kvmesh.engine.torch_engine import TorchCore
from kvmesh.sampling import SamplingParams
from kvmesh.types import GenerateRequest, TokenOutput

GREEDY = SamplingParams(max_tokens=32, temperature=0.0)


def run_until_idle(core: TorchCore, max_steps: int = 100_000) -> list[StepOutput]:
    outputs: list[StepOutput] = []
    for _ in range(max_steps):
        if not core.has_work:
            return outputs
        outputs += core.step()
    raise AssertionError(f"engine still busy after {max_steps} steps")


def tokens_by_request(outputs: Iterable[StepOutput]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = defaultdict(list)
    for out in outputs:
        if isinstance(out, TokenOutput):
            tokens[out.request_id] += out.token_ids
    return dict(tokens)


def generate(
    core: TorchCore,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams = GREEDY,
    *,
    prefix: str = "req",
) -> list[list[int]]:
    """Submit all prompts at once, run to completion, return each one's output tokens."""
    ids = [f"{prefix}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        core.add(GenerateRequest(request_id, tuple(prompt), params))
    tokens = tokens_by_request(run_until_idle(core))
    return [tokens.get(request_id, []) for request_id in ids]


def generate_one_at_a_time(
    core: TorchCore, prompts: Sequence[Sequence[int]], params: SamplingParams = GREEDY
) -> list[list[int]]:
    return [generate(core, [p], params, prefix=f"solo{i}")[0] for i, p in enumerate(prompts)]


def tiny_core(**overrides: object) -> TorchCore:
    """The tiny dummy Llama on the CPU, blocks of 4: what engine unit tests run on."""
    settings: dict[str, object] = {
        "model": "dummy:llama-tiny",
        "device": "cpu",
        "block_size": 4,
        "num_blocks": 128,
        "max_num_batched_tokens": 64,
    }
    settings.update(overrides)
    return TorchCore(EngineConfig(**settings), show_progress=False)  # type: ignore[arg-type]
