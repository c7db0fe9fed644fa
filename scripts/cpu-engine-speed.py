"""The torch engine's own speed on a CPU (no transformers): tokens/s for one stream and for 16
concurrent requests on the default model, best of three, greedy, 32 tokens each.

Compares two revisions side by side: run it alternately from each checkout, e.g.

    (cd OLD && PYTHONPATH=$PWD ../main/.venv/bin/python ../main/scripts/cpu-engine-speed.py)
    (cd NEW && PYTHONPATH=$PWD .venv/bin/python scripts/cpu-engine-speed.py sdpa)

The optional argument names the attention backend; the import fallback reads revisions from
before the engine layer's split (issue 11), which had neither backends nor these modules.
"""

import sys
import time
from typing import Any

from kvmesh.bench.prompts import chat_prompt_ids

backend = sys.argv[1] if len(sys.argv) > 1 else None
try:
    from kvmesh.engine import EngineConfig
    from kvmesh.engine.torch_engine import TorchCore as Core
    from kvmesh.sampling import SamplingParams
    from kvmesh.types import GenerateRequest, TokenOutput

    config = EngineConfig(device="cpu", **({"attention_backend": backend} if backend else {}))
except ImportError:  # before the split
    from kvmesh.engine import (  # type: ignore[attr-defined,no-redef]
        EngineConfig,
        GenerateRequest,
        SamplingParams,
        TokenOutput,
    )
    from kvmesh.engine import (
        EngineCore as Core,
    )

    config = EngineConfig(device="cpu")

core: Any = Core(config, show_progress=False)
core.warm_up()
prompts = chat_prompt_ids(core, 16)
params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


def run(batch: list[list[int]], tag: str) -> float:
    for i, prompt in enumerate(batch):
        core.add(GenerateRequest(f"{tag}-{i}", tuple(prompt), params))
    produced, started = 0, time.perf_counter()
    while core.has_work:
        produced += sum(len(o.token_ids) for o in core.step() if isinstance(o, TokenOutput))
    return produced / (time.perf_counter() - started)


single = max(run(prompts[:1], f"single-{r}") for r in range(3))
concurrent = max(run(prompts, f"concurrent-{r}") for r in range(3))
print(f"{backend or 'default'} single {single:.1f} concurrent16 {concurrent:.1f} tokens/s")
