from __future__ import annotations

from typing import Any

import pytest

from kvmesh.bench.prompts import CHAT_PROMPTS
from kvmesh.bench.reference import transformers_model
from kvmesh.engine import EngineConfig
from kvmesh.engine.torch_engine import TorchCore


@pytest.fixture(scope="session")
def smollm2() -> TorchCore:
    """The default model on CPU (float32)."""
    return TorchCore(EngineConfig(model="smollm2", device="cpu"), show_progress=False)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2: TorchCore) -> Any:
    return transformers_model(smollm2)


@pytest.fixture(scope="session")
def chat_prompts(smollm2: TorchCore) -> list[list[int]]:
    tokenizer = smollm2.tokenizer
    assert tokenizer is not None
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
