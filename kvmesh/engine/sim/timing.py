"""How long a step takes on a GPU: a roofline over the model's shape.

A step runs some prefill chunks (new prompt tokens after a cached or computed context) and some
decode rows (one token each). With P = peak FLOP/s, W = HBM bytes/s, e_p, e_d the calibrated
efficiencies and o the per-step overhead (`kvmesh.engine.sim.gpus`):

    prefill part  max(F_p / (P·e_p), B_p / (W·e_d))
        F_p = Σ 2·linear·n  +  Σ attention(n, c)  +  2·lm_head per row that samples
        B_p = weights + Σ KV read (c tokens) + KV written (n tokens)
    decode part   max(F_d / (P·e_p), B_d / (W·e_d))
        F_d, B_d alike, one token per row; B_d counts the weights only when the step has no
        prefill chunk — a mixed step streams them once
    step          prefill part + decode part + o

`linear` is the decoder's matmul parameters per token (attention projections and MLP; the
embedding is a lookup, not a matmul); the LM head (vocab × hidden) runs only for rows that
sample. `attention(n, c)` is causal: each of the n new tokens attends to the c cached tokens and
the new ones before it, 4·heads·head_dim FLOPs per (query, key) pair per layer (QKᵀ and PV).
Weights and KV are 16-bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvmesh.engine.sim.gpus import Calibration, GpuSpec
from kvmesh.models import ModelConfig

BYTES_PER_VALUE = 2  # bfloat16 / float16 weights and KV


@dataclass(frozen=True, slots=True)
class ModelShape:
    num_layers: int
    num_heads: int
    head_dim: int
    linear_params: int  # matmul parameters a token runs through, LM head excluded
    lm_head_params: int
    total_params: int  # what the weights occupy in memory (embeddings included)
    kv_bytes_per_token: int

    @classmethod
    def of(cls, mc: ModelConfig) -> ModelShape:
        h, q = mc.hidden_size, mc.num_heads * mc.head_dim
        kv = mc.num_kv_heads * mc.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * mc.intermediate_size
        return cls(
            num_layers=mc.num_layers,
            num_heads=mc.num_heads,
            head_dim=mc.head_dim,
            linear_params=mc.num_layers * per_layer,
            lm_head_params=mc.vocab_size * h,
            total_params=mc.num_parameters,
            kv_bytes_per_token=2 * mc.num_layers * kv * BYTES_PER_VALUE,
        )

    @property
    def weight_bytes(self) -> int:
        """Bytes a step streams from HBM: every matmul's weights, the LM head included."""
        return (self.linear_params + self.lm_head_params) * BYTES_PER_VALUE

    @property
    def resident_bytes(self) -> int:
        """Bytes the weights occupy on the GPU."""
        return self.total_params * BYTES_PER_VALUE

    def attention_flops(self, num_new: int, num_context: int) -> float:
        pairs = num_new * num_context + num_new * (num_new + 1) / 2
        return 4.0 * self.num_layers * self.num_heads * self.head_dim * pairs


@dataclass(frozen=True, slots=True)
class ChunkWork:
    """One sequence's share of a step."""

    num_new_tokens: int
    num_context_tokens: int  # already in the KV cache before this step
    samples: bool  # the chunk ends at the sequence's last token: the LM head runs

    @property
    def is_decode(self) -> bool:
        return self.num_new_tokens == 1 and self.num_context_tokens > 0


@dataclass(frozen=True, slots=True)
class StepBreakdown:
    prefill_compute_s: float
    prefill_memory_s: float
    decode_compute_s: float
    decode_memory_s: float
    overhead_s: float

    @property
    def prefill_s(self) -> float:
        return max(self.prefill_compute_s, self.prefill_memory_s)

    @property
    def decode_s(self) -> float:
        return max(self.decode_compute_s, self.decode_memory_s)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s + self.overhead_s


class StepTimeModel:
    def __init__(self, shape: ModelShape, gpu: GpuSpec, calibration: Calibration) -> None:
        self.shape = shape
        self.gpu = gpu
        self.calibration = calibration
        self._flops_per_s = gpu.peak_bf16_flops * calibration.prefill_efficiency
        self._bytes_per_s = gpu.hbm_bytes_per_s * calibration.decode_efficiency

    def step_seconds(self, chunks: Sequence[ChunkWork]) -> float:
        return self.breakdown(chunks).total_s if chunks else 0.0

    def breakdown(self, chunks: Sequence[ChunkWork]) -> StepBreakdown:
        prefill = [c for c in chunks if not c.is_decode]
        decode = [c for c in chunks if c.is_decode]
        weights = self.shape.weight_bytes
        prefill_flops, prefill_bytes = self._work(prefill)
        decode_flops, decode_bytes = self._work(decode)
        return StepBreakdown(
            prefill_compute_s=prefill_flops / self._flops_per_s,
            prefill_memory_s=(prefill_bytes + weights) / self._bytes_per_s if prefill else 0.0,
            decode_compute_s=decode_flops / self._flops_per_s,
            decode_memory_s=(
                (decode_bytes + (0 if prefill else weights)) / self._bytes_per_s if decode else 0.0
            ),
            overhead_s=self.calibration.step_overhead_s if chunks else 0.0,
        )

    def prefill_seconds(self, num_tokens: int, num_cached: int = 0) -> float:
        """One prompt alone, in one step (ignoring the chunk budget)."""
        return self.step_seconds([ChunkWork(num_tokens - num_cached, num_cached, samples=True)])

    def decode_seconds(self, batch: int, context: int) -> float:
        """One decode step of `batch` rows, each with `context` tokens cached."""
        return self.step_seconds([ChunkWork(1, context, samples=True)] * batch)

    def _work(self, chunks: Sequence[ChunkWork]) -> tuple[float, float]:
        """FLOPs and KV bytes (weights apart) of a group of chunks."""
        shape = self.shape
        flops = 0.0
        kv_tokens = 0
        for c in chunks:
            flops += 2.0 * shape.linear_params * c.num_new_tokens
            flops += shape.attention_flops(c.num_new_tokens, c.num_context_tokens)
            if c.samples:
                flops += 2.0 * shape.lm_head_params
            kv_tokens += c.num_context_tokens + c.num_new_tokens
        return flops, float(kv_tokens * shape.kv_bytes_per_token)
