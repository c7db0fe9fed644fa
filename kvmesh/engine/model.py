"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over the paged KV cache.

The forward pass takes a flat batch: the scheduled tokens of every sequence concatenated, each
with its position and the cache slot its K/V goes to. Attention reads each sequence's context
through its block table. Weights are plain tensors (q/k/v and gate/up fused) driven by
functional ops; there is no nn.Module tree to walk on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvmesh.engine.attention import AttentionMetadata, paged_attention
from kvmesh.engine.config import ModelConfig
from kvmesh.engine.loader import WeightSource
from kvmesh.kv.cache import PagedKvCache


@dataclass(slots=True)
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the model, in Hugging Face naming, with its shape."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
        if config.qkv_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        weights: WeightSource,
        *,
        device: torch.device,
        dtype: torch.dtype,
        show_progress: bool = True,
    ) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        shapes = expected_shapes(config)

        def get(name: str) -> torch.Tensor:
            return weights.get(name, shapes[name])

        self.embed = get("model.embed_tokens.weight")
        self.layers: list[_Layer] = []
        for n in tqdm(range(config.num_layers), desc="loading layers", disable=not show_progress):
            p = f"model.layers.{n}."
            attn, mlp = p + "self_attn.", p + "mlp."
            bias = None
            if config.qkv_bias:
                bias = torch.cat([get(attn + f"{x}_proj.bias") for x in "qkv"])
            self.layers.append(
                _Layer(
                    input_norm=get(p + "input_layernorm.weight"),
                    qkv=torch.cat([get(attn + f"{x}_proj.weight") for x in "qkv"]),
                    qkv_bias=bias,
                    o=get(attn + "o_proj.weight"),
                    post_norm=get(p + "post_attention_layernorm.weight"),
                    gate_up=torch.cat([get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")]),
                    down=get(mlp + "down_proj.weight"),
                )
            )
        self.norm = get("model.norm.weight")
        self.lm_head = self.embed if config.tie_word_embeddings else get("lm_head.weight")
        self._inv_freq, self._rope_scale = _rope_frequencies(config, device)
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5

    @property
    def weight_bytes(self) -> int:
        tensors = [self.embed, self.norm]
        if self.lm_head is not self.embed:
            tensors.append(self.lm_head)
        for layer in self.layers:
            tensors += [layer.input_norm, layer.qkv, layer.o, layer.post_norm]
            tensors += [layer.gate_up, layer.down]
            if layer.qkv_bias is not None:
                tensors.append(layer.qkv_bias)
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_cache: PagedKvCache,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (float32) for the tokens at `logits_indices` of the flat batch."""
        cfg = self.config
        num_tokens = input_ids.shape[0]
        cos, sin = self._rope(positions)
        hidden = F.embedding(input_ids, self.embed)
        for n, layer in enumerate(self.layers):
            residual = hidden
            x = _rms_norm(hidden, layer.input_norm, cfg.rms_norm_eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            # q and k are adjacent in the fused projection: rotate them in one go.
            qk = _apply_rope(
                qkv[:, : self.q_size + self.kv_size].view(num_tokens, -1, cfg.head_dim), cos, sin
            )
            q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads :]
            v = qkv[:, self.q_size + self.kv_size :].view(
                num_tokens, cfg.num_kv_heads, cfg.head_dim
            )
            out = paged_attention(q, k, v, kv_cache.layers[n], attn, self.scale)
            hidden = residual + F.linear(out.reshape(num_tokens, self.q_size), layer.o)
            residual = hidden
            x = _rms_norm(hidden, layer.post_norm, cfg.rms_norm_eps)
            gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)
            hidden = residual + F.linear(F.silu(gate) * up, layer.down)
        last = _rms_norm(hidden[logits_indices], self.norm, cfg.rms_norm_eps)
        return F.linear(last, self.lm_head).float()

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed in float32 and cast, as transformers does, so logits agree closely.
        freqs = positions[:, None].float() * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self._rope_scale).to(self.dtype)
        sin = (emb.sin() * self._rope_scale).to(self.dtype)
        # rotate_half(x) * sin == roll(x, half) * [-sin_lo, sin_hi]: one op fewer per layer.
        sin = torch.cat((-sin[:, : sin.shape[1] // 2], sin[:, sin.shape[1] // 2 :]), dim=-1)
        return cos[:, None, :], sin[:, None, :]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    # Normalise in float32 and scale after casting back, as transformers does.
    normed = F.rms_norm(x.float(), weight.shape, None, eps)
    return weight * normed.to(x.dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split layout; `sin` carries the rotation's signs."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def _rope_frequencies(config: ModelConfig, device: torch.device) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, by the config's RoPE type (llama3, yarn, ...)."""
    params = getattr(config.hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = float(params.get("rope_theta", getattr(config.hf_config, "rope_theta", 10000.0)))
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        return inv_freq.to(device), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        from kvmesh.engine.errors import ModelLoadError

        raise ModelLoadError(f"unsupported RoPE type {rope_type!r}")
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config.hf_config, device)
    return inv_freq.float().to(device), float(scale)
