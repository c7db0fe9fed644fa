"""Triton kernels of the torch engine's GPU fast path (tuned for Hopper, bf16; dtype-generic).

    decode.py    paged decode attention: split-KV stage 1 (GQA heads grouped) + combine stage 2
    prefill.py   paged prefill attention over a cached prefix, FlashAttention-2 style
    fused.py     rms_norm, fused_add_rms_norm, silu_and_mul
    rope.py      rope_and_write_kv: rotary embedding in place + K/V written to the paged cache

Every wrapper matches a pure PyTorch reference (`kvmesh.engine.attention.paged` for attention,
transformers' rounding for the rest) and is tested under Triton's CPU interpreter
(tests/unit/engine/test_triton_kernels.py) and on CUDA (tests/gpu/test_triton_kernels.py).
Importing this package compiles nothing: kernels compile on first launch.
"""

from kvmesh.engine.kernels.decode import (
    DecodeConfig,
    DecodeWorkspace,
    choose_num_splits,
    decode_config,
    decode_workspace,
    paged_decode_attention,
)
from kvmesh.engine.kernels.fused import fused_add_rms_norm, rms_norm, silu_and_mul
from kvmesh.engine.kernels.prefill import (
    PrefillConfig,
    choose_prefill_config,
    paged_prefill_attention,
    prefill_config,
)
from kvmesh.engine.kernels.rope import rope_and_write_kv

__all__ = [
    "DecodeConfig",
    "DecodeWorkspace",
    "PrefillConfig",
    "choose_num_splits",
    "choose_prefill_config",
    "decode_config",
    "decode_workspace",
    "fused_add_rms_norm",
    "paged_decode_attention",
    "paged_prefill_attention",
    "prefill_config",
    "rms_norm",
    "rope_and_write_kv",
    "silu_and_mul",
]
