"""Configuration: the model's architecture (from its Hugging Face config) and engine settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvmesh.engine.errors import InvalidRequestError, ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shape of a Llama-family decoder, read from a transformers `PretrainedConfig`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    eos_token_ids: tuple[int, ...]
    hf_config: Any = field(repr=False, compare=False)  # kept for RoPE initialisation

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(SUPPORTED_MODEL_TYPES)
            raise ModelLoadError(f"unsupported model type {model_type!r}; supported: {supported}")
        num_heads = int(hf_config.num_attention_heads)
        hidden = int(hf_config.hidden_size)
        head_dim = getattr(hf_config, "head_dim", None) or hidden // num_heads
        eos = hf_config.eos_token_id
        eos_ids = (
            tuple(int(e) for e in eos)
            if isinstance(eos, list | tuple)
            else (() if eos is None else (int(eos),))
        )
        # Qwen2 always has q/k/v biases; Llama and Mistral only when the config says so.
        qkv_bias = model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False))
        max_pos = int(hf_config.max_position_embeddings)
        window = getattr(hf_config, "sliding_window", None)
        if window and getattr(hf_config, "use_sliding_window", True) and window < max_pos:
            # Attention is exact only while every token sees the whole context.
            max_pos = int(window)
        return cls(
            model_type=model_type,
            vocab_size=int(hf_config.vocab_size),
            hidden_size=hidden,
            intermediate_size=int(hf_config.intermediate_size),
            num_layers=int(hf_config.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=int(getattr(hf_config, "num_key_value_heads", None) or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf_config.rms_norm_eps),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            eos_token_ids=eos_ids,
            hf_config=hf_config,
        )

    @property
    def num_parameters(self) -> int:
        """Parameters of the decoder (embeddings counted once when tied)."""
        h, i = self.hidden_size, self.intermediate_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        per_layer = attn + 3 * h * i + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h


@dataclass(slots=True)
class EngineConfig:
    """Engine settings. Defaults suit the embedded default model on a CPU."""

    model: str = "smollm2"
    """`smollm2` (the packaged default), a Hugging Face directory, a .gguf file, or
    `dummy:<preset or config.json>` for random weights at a real shape."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`."""
    dtype: str = "auto"
    """`auto` (float32 on CPU, bfloat16 on CUDA), `float32`, `bfloat16` or `float16`."""
    block_size: int = 16
    num_blocks: int | None = None
    """KV blocks in the pool; None sizes it from `kv_cache_bytes` or the free GPU memory."""
    kv_cache_bytes: int | None = None
    gpu_memory_fraction: float = 0.85
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    """Tokens run through one forward step: long prompts are prefilled in chunks of this."""
    max_model_len: int | None = None
    """Context limit (prompt + output); None means the model's own."""
    enable_prefix_cache: bool = True
    seed: int = 0
    """Seed of dummy weights."""
    model_id: str | None = None
    """The name folded into block hashes; None derives it from the model source."""

    def validate(self) -> None:
        checks = [
            (self.block_size >= 1, "block_size must be >= 1"),
            (self.num_blocks is None or self.num_blocks >= 1, "num_blocks must be >= 1"),
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1"),
            (0.0 < self.gpu_memory_fraction <= 1.0, "gpu_memory_fraction must be in (0, 1]"),
            (self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be >= 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidRequestError(
                f"device {self.device!r} asked for, but CUDA is not available"
            )
        return device

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if self.dtype not in dtypes:
            raise InvalidRequestError(f"dtype must be one of auto, {', '.join(dtypes)}")
        return dtypes[self.dtype]
