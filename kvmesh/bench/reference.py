"""transformers as the peer implementation: the same weights, logits to compare against.

Used by the accuracy tests, `kvmesh check-accuracy` and the GPU checks.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from kvmesh import models
from kvmesh.engine import loader
from kvmesh.engine.attention.common import SequenceSlice
from kvmesh.engine.model import expected_shapes
from kvmesh.engine.torch_engine import TorchCore


def engine_logits(core: TorchCore, prompt: list[int], *, split: int | None = None) -> torch.Tensor:
    """Teacher-forced logits at every prompt position, through the engine's paged KV cache.

    With `split`, the first `split` tokens run as one step and the rest as a second step over
    them, now cached: the path of a prefix-cache hit or a chunked prompt.
    """
    block_size = core.block_size
    device = core.model.device
    blocks = core.pool.allocate(-(-len(prompt) // block_size))
    cuts = [0, len(prompt)] if split is None else [0, split, len(prompt)]
    try:
        parts = []
        for start, end in itertools.pairwise(cuts):
            meta = core.model.attention.build(
                [SequenceSlice(end - start, start, blocks)], block_size, device
            )
            parts.append(
                core.model.forward(
                    torch.tensor(prompt[start:end], device=device),
                    torch.arange(start, end, device=device),
                    meta,
                    core.kv_cache,
                    None,
                )
            )
        return torch.cat(parts)
    finally:
        core.pool.release(blocks)


def transformers_model(core: TorchCore) -> Any:
    """A transformers model holding exactly the engine's weights, same device and dtype."""
    from transformers import AutoModelForCausalLM

    spec = core.config.model
    device, dtype = core.model.device, core.model.dtype
    if spec.startswith("dummy:"):
        loaded = loader.load(spec, device=device, dtype=dtype, seed=core.config.seed)
        with torch.device(device):  # initialised where it runs: minutes less for 8B on a CPU
            model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
                loaded.config.hf_config, dtype=dtype
            )
        shapes = expected_shapes(loaded.config)
        state = {name: loaded.weights.get(name, shape) for name, shape in shapes.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        model.tie_weights()
    else:
        source = models.resolve(spec)
        model = AutoModelForCausalLM.from_pretrained(str(source.weights_dir), dtype=dtype)
    return model.to(device).eval()


def reference_logits(core: TorchCore, prompt: list[int], model: Any = None) -> torch.Tensor:
    model = model if model is not None else transformers_model(core)
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=core.model.device)
        logits: torch.Tensor = model(ids).logits[0].float()
        return logits


def transformers_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy `generate` (stops at EOS like the engine does)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt], device=device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            top_p=None,
            top_k=None,
            temperature=None,
        )
    return [int(t) for t in out[0, len(prompt) :]]
