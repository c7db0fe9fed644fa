"""Engine settings, shared by every engine (torch-free: workers parse them before choosing one).

Each default is written here once; `kvmesh.options` builds the command-line options from them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvmesh.errors import InvalidRequestError

DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8_e4m3")
ATTENTION_BACKENDS = ("auto", "sdpa", "paged", "triton")
SPECULATION_METHODS = ("ngram",)


@dataclass(slots=True)
class EngineConfig:
    """Engine settings. Defaults suit the embedded default model on a CPU."""

    engine: str = "torch"
    """The engine, by its registry name (`kvmesh.engine.registry`): `torch`, `sim`, a plug-in."""
    model: str = "smollm2"
    """`smollm2` (the packaged default), a Hugging Face directory, a .gguf file, or
    `dummy:<preset or config.json>` for random weights at a real shape."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`."""
    dtype: str = "auto"
    """`auto` (float32 on CPU, bfloat16 on CUDA), `float32`, `bfloat16` or `float16`."""
    kv_dtype: str = "auto"
    """The KV cache's dtype: `auto` (the model's dtype), `float32`, `bfloat16`, `float16`, or
    `fp8_e4m3` (FP8 with per-block, per-head scales; the sdpa and paged backends)."""
    transfer_dtype: str = "auto"
    """The dtype exported KV is sent in: `auto` (the KV cache's) or another KV dtype; a
    prefill worker with `fp8_e4m3` over a 16-bit cache sends half the bytes."""
    block_size: int = 16
    num_blocks: int | None = None
    """KV blocks in the pool; None sizes it from `kv_cache_bytes` or the free GPU memory."""
    kv_cache_bytes: int | None = None
    gpu_memory_fraction: float = 0.85
    max_num_seqs: int = 64
    max_num_waiting: int = 1024
    """Requests waiting to be scheduled; past it, a new one is refused (RESOURCE_EXHAUSTED)."""
    max_num_batched_tokens: int = 2048
    """Tokens run through one forward step: long prompts are prefilled in chunks of this."""
    max_model_len: int | None = None
    """Context limit (prompt + output); None means the model's own."""
    enable_prefix_cache: bool = True
    seed: int = 0
    """Seed of dummy weights."""
    model_id: str | None = None
    """The name folded into block hashes; None derives it from the model source."""
    attention_backend: str = "auto"
    """`sdpa` (gather + PyTorch SDPA), `paged` (pure PyTorch, reads blocks in place), `triton`
    (GPU kernels); `auto`: triton on CUDA, sdpa on CPU."""
    cuda_graphs: bool = True
    """Capture decode steps as CUDA graphs (CUDA with the triton backend only)."""
    async_scheduling: bool | None = None
    """Schedule and launch each step before reading the previous one's tokens, so the host's
    work overlaps the device's; None: on where the executor runs ahead of the host (a GPU)."""
    num_threads: int = 0
    """CPU threads for the engine's math (0: the library's default)."""
    speculate: str | None = None
    """Speculative decoding: None (off) or `ngram` (prompt lookup: drafts copied from the
    sequence's own earlier tokens, verified in one forward pass). Runs with synchronous
    scheduling."""
    num_speculative_tokens: int = 4
    """Draft tokens proposed per decoding sequence and step (at most)."""
    ngram_max: int = 3
    """Longest suffix looked up for a draft (vLLM's `prompt_lookup_max`)."""
    ngram_min: int = 1
    """Shortest suffix looked up for a draft (vLLM's `prompt_lookup_min`)."""
    options: dict[str, str] = field(default_factory=dict)
    """Engine-specific settings (`--engine-arg KEY=VALUE`), read by the engine that knows them."""

    def validate(self) -> None:
        checks = [
            (self.block_size >= 1, "block_size must be >= 1"),
            (self.num_blocks is None or self.num_blocks >= 1, "num_blocks must be >= 1"),
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.max_num_waiting >= 1, "max_num_waiting must be >= 1"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1"),
            (0.0 < self.gpu_memory_fraction <= 1.0, "gpu_memory_fraction must be in (0, 1]"),
            (self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be >= 2"),
            (self.num_threads >= 0, "num_threads must be >= 0"),
            (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}"),
            (self.kv_dtype in KV_DTYPES, f"kv_dtype must be one of {', '.join(KV_DTYPES)}"),
            (
                self.transfer_dtype in KV_DTYPES,
                f"transfer_dtype must be one of {', '.join(KV_DTYPES)}",
            ),
            (
                self.attention_backend in ATTENTION_BACKENDS,
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}",
            ),
            (
                self.speculate is None or self.speculate in SPECULATION_METHODS,
                f"speculate must be one of {', '.join(SPECULATION_METHODS)} (or unset: off)",
            ),
            (self.num_speculative_tokens >= 1, "num_speculative_tokens must be >= 1"),
            (self.ngram_min >= 1, "ngram_min must be >= 1"),
            (
                self.ngram_max >= self.ngram_min,
                f"ngram_max ({self.ngram_max}) must be >= ngram_min ({self.ngram_min})",
            ),
            (
                self.speculate is None or self.async_scheduling is not True,
                "speculative decoding runs with synchronous scheduling: "
                "leave async_scheduling unset or turn it off",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)


def parse_engine_args(
    engine: str,
    options: Mapping[str, str],
    converters: Mapping[str, Callable[[str], Any]],
) -> dict[str, Any]:
    """An engine's `--engine-arg KEY=VALUE` settings (`EngineConfig.options`) converted, one
    converter per known key; InvalidRequestError naming an unknown key or a bad value."""
    unknown = sorted(set(options) - set(converters))
    if unknown:
        raise InvalidRequestError(
            f"unknown {engine} engine option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(converters))}"
        )
    values: dict[str, Any] = {}
    for key, text in options.items():
        try:
            values[key] = converters[key](text)
        except ValueError as e:
            raise InvalidRequestError(f"{engine} engine option {key}={text!r}: {e}") from e
    return values
