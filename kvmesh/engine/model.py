"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over the paged KV cache.

The forward pass takes a flat batch: the scheduled tokens of every sequence concatenated, each
with its position and the cache slot its K/V goes to. Attention reads each sequence's context
through its block table, by the worker's attention backend (`kvmesh.engine.attention`); the
operations around it come from `kvmesh.engine.ops` (plain PyTorch, or fused Triton kernels with
the triton backend). Weights are plain tensors (q/k/v and gate/up fused) driven by functional
ops; there is no nn.Module tree to walk on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvmesh.engine.attention import AttentionBackend
from kvmesh.engine.attention.common import AttentionMetadata
from kvmesh.engine.loader import WeightSource
from kvmesh.engine.ops import ModelOps, TorchOps, TritonOps
from kvmesh.errors import ModelLoadError
from kvmesh.kv.cache import PagedKvCache
from kvmesh.models import ModelConfig


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
        attention: AttentionBackend,
        block_size: int,
        max_positions: int | None = None,
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
        self.q_size = config.num_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        self.attention = attention
        inv_freq, rope_scale = _rope_frequencies(config, device)
        heads = {
            "num_heads": config.num_heads,
            "num_kv_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
        }
        self.ops: ModelOps = (
            TritonOps(
                inv_freq, rope_scale, max_positions or config.max_position_embeddings, **heads
            )
            if attention.fused_ops
            else TorchOps(inv_freq, rope_scale, dtype, block_size=block_size, **heads)
        )

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
        logits_indices: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits (float32) for the tokens at `logits_indices` of the flat batch (None: all)."""
        cfg, ops = self.config, self.ops
        num_tokens = input_ids.shape[0]
        step = ops.prepare(positions, attn)
        hidden = F.embedding(input_ids, self.embed)
        residual: torch.Tensor | None = None
        for n, layer in enumerate(self.layers):
            x, residual = ops.add_rms_norm(hidden, residual, layer.input_norm, cfg.rms_norm_eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            q, k, v = ops.rope_and_store(qkv, step, kv_cache.layers[n])
            out = self.attention.attend(q, k, v, kv_cache.layers[n], attn, self.scale)
            hidden = F.linear(out.reshape(num_tokens, self.q_size), layer.o)
            x, residual = ops.add_rms_norm(hidden, residual, layer.post_norm, cfg.rms_norm_eps)
            hidden = F.linear(ops.silu_and_mul(F.linear(x, layer.gate_up)), layer.down)
        assert residual is not None
        if logits_indices is not None:
            hidden, residual = hidden[logits_indices], residual[logits_indices]
        last, _ = ops.add_rms_norm(hidden, residual, self.norm, cfg.rms_norm_eps)
        return F.linear(last, self.lm_head).float()


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
        raise ModelLoadError(f"unsupported RoPE type {rope_type!r}")
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config.hf_config, device)
    return inv_freq.float().to(device), float(scale)
