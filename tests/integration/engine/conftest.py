from __future__ import annotations

from typing import Any

import pytest

from kvmesh.bench.prompts import CHAT_PROMPTS
from kvmesh.bench.reference import transformers_model
from kvmesh.engine import EngineConfig, EngineCore


@pytest.fixture(scope="session")
def smollm2() -> EngineCore:
    """The default model on CPU (float32)."""
    return EngineCore(EngineConfig(model="smollm2", device="cpu"), show_progress=False)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2: EngineCore) -> Any:
    return transformers_model(smollm2)


@pytest.fixture(scope="session")
def chat_prompts(smollm2: EngineCore) -> list[list[int]]:
    tokenizer = smollm2.tokenizer
    assert tokenizer is not None
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
