"""The model's non-attention operations, in two implementations with one interface.

- `TorchOps`: plain PyTorch, numerically as transformers computes a Llama layer (RMSNorm in
  float32, scaled after casting back; rotary tables computed in float32 and cast). CPU, and any
  backend but `triton`.
- `TritonOps`: fused Triton kernels on CUDA: the residual add fused into the RMSNorm, rotary
  fused with the KV-cache write, SiLU fused with the multiply. Each fusion saves a pass over
  activations and, on the decode path, a kernel launch per layer.

The model calls them in the same order either way:

    step        = prepare(positions, meta)                 # once per step
    x, residual = add_rms_norm(hidden, residual, weight)   # residual None: first layer
    q, k, v     = rope_and_store(qkv, step, layer_cache)
    out         = silu_and_mul(gate_up)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from kvmesh.engine.attention.common import AttentionMetadata, LayerCache, write_kv


class ModelOps(Protocol):
    def prepare(self, positions: torch.Tensor, meta: AttentionMetadata) -> Any:
        """Per-step state (rotary tables, where the K/V go), computed once for every layer."""
        ...

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual) * weight, x + residual); residual None means x alone."""
        ...

    def rope_and_store(
        self, qkv: torch.Tensor, step: Any, layer_cache: LayerCache
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotate q and k, store k and v in the cache; q `[T, Hq, D]`, k, v `[T, Hkv, D]`."""
        ...

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...


class _TorchStep(NamedTuple):
    cos: torch.Tensor
    sin: torch.Tensor
    slots: tuple[torch.Tensor, torch.Tensor]  # (blocks, offsets) of the new tokens' K/V


class _TritonStep(NamedTuple):
    positions: torch.Tensor
    slot_mapping: torch.Tensor


class TorchOps:
    def __init__(
        self,
        inv_freq: torch.Tensor,
        rope_scale: float,
        dtype: torch.dtype,
        *,
        block_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
    ) -> None:
        self._inv_freq = inv_freq
        self._rope_scale = rope_scale
        self._dtype = dtype
        self._block_size = block_size
        self._num_heads = num_heads
        self._num_kv_heads = num_kv_heads
        self._head_dim = head_dim

    def prepare(self, positions: torch.Tensor, meta: AttentionMetadata) -> _TorchStep:
        block_size = self._block_size
        slots = (meta.slot_mapping // block_size, meta.slot_mapping % block_size)
        return _TorchStep(*self._rope(positions), slots)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed in float32 and cast, as transformers does, so logits agree closely.
        freqs = positions[:, None].float() * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self._rope_scale).to(self._dtype)
        sin = (emb.sin() * self._rope_scale).to(self._dtype)
        # rotate_half(x) * sin == roll(x, half) * [-sin_lo, sin_hi]: one op fewer per layer.
        sin = torch.cat((-sin[:, : sin.shape[1] // 2], sin[:, sin.shape[1] // 2 :]), dim=-1)
        return cos[:, None, :], sin[:, None, :]

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        summed = x if residual is None else residual + x
        return rms_norm(summed, weight, eps), summed

    def rope_and_store(
        self, qkv: torch.Tensor, step: _TorchStep, layer_cache: LayerCache
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_tokens, d = qkv.shape[0], self._head_dim
        q_size, kv_size = self._num_heads * d, self._num_kv_heads * d
        # q and k are adjacent in the fused projection: rotate them in one go.
        qk = qkv[:, : q_size + kv_size].view(num_tokens, -1, d)
        qk = qk * step.cos + qk.roll(d // 2, dims=-1) * step.sin
        q, k = qk[:, : self._num_heads], qk[:, self._num_heads :]
        v = qkv[:, q_size + kv_size :].view(num_tokens, self._num_kv_heads, d)
        write_kv(k, v, layer_cache, step.slots)
        return q, k, v

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class TritonOps:
    def __init__(
        self,
        inv_freq: torch.Tensor,
        rope_scale: float,
        max_positions: int,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
    ) -> None:
        from kvmesh.engine.kernels import fused, rope

        self._kernels = fused
        self._rope_and_write_kv = rope.rope_and_write_kv
        positions = torch.arange(max_positions, device=inv_freq.device, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        # [max_positions, D]: cos of the D/2 frequencies, then their sin, scaled.
        self._cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * rope_scale
        self._num_heads = num_heads
        self._num_kv_heads = num_kv_heads
        self._head_dim = head_dim

    def prepare(self, positions: torch.Tensor, meta: AttentionMetadata) -> _TritonStep:
        return _TritonStep(positions, meta.slot_mapping)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._kernels.rms_norm(x, weight, eps), x
        self._kernels.fused_add_rms_norm(x, residual, weight, eps)  # both in place
        return x, residual

    def rope_and_store(
        self, qkv: torch.Tensor, step: _TritonStep, layer_cache: LayerCache
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, hkv, d = self._num_heads, self._num_kv_heads, self._head_dim
        assert isinstance(layer_cache, torch.Tensor), "the Triton kernels write 16-bit KV"
        self._rope_and_write_kv(
            qkv,
            step.positions,
            self._cos_sin,
            layer_cache,
            step.slot_mapping,
            num_heads=h,
            num_kv_heads=hkv,
            head_dim=d,
        )
        num_tokens = qkv.shape[0]
        heads = qkv.view(num_tokens, h + 2 * hkv, d)
        return heads[:, :h], heads[:, h : h + hkv], heads[:, h + hkv :]

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._kernels.silu_and_mul(gate_up)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    # Normalise in float32 and scale after casting back, as transformers does.
    normed = F.rms_norm(x.float(), weight.shape, None, eps)
    return weight * normed.to(x.dtype)
