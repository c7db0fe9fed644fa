"""The torch engine: kvmesh's own Llama-family forward over a paged KV cache in PyTorch.

`TorchCore` is an `EngineCore` whose executor is the model runner: it loads the weights, sizes
and allocates the KV pool, and picks the attention backend. `TorchEngine` is the async engine
over it (registry name `torch`), the one that exposes its KV to NIXL (TransferMode.MESH).
"""

from __future__ import annotations

import torch

from kvmesh.engine import loader
from kvmesh.engine.attention import resolve_backend
from kvmesh.engine.config import EngineConfig
from kvmesh.engine.core import EngineCore
from kvmesh.engine.driver import AsyncEngine
from kvmesh.engine.exports import ExportPool
from kvmesh.engine.model import LlamaModel
from kvmesh.engine.runner import ModelRunner
from kvmesh.errors import InvalidRequestError
from kvmesh.kv.cache import KvLayout, PagedKvCache, dtype_name, kv_dtype
from kvmesh.models import ModelConfig
from kvmesh.types import EngineInfo, TransferMode

_CPU_KV_CACHE_BYTES = 1 << 30
_GPU_ACTIVATION_RESERVE = 2 << 30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(f"device {name!r} asked for, but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise InvalidRequestError(f"dtype must be one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


class TorchCore(EngineCore):
    """An `EngineCore` running the model: weights, KV pool and runner built here."""

    def __init__(self, config: EngineConfig, *, show_progress: bool = True) -> None:
        config.validate()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        backend = resolve_backend(config.attention_backend, device)
        loaded = loader.load(config.model, device=device, dtype=dtype, seed=config.seed)
        mc = loaded.config
        self.model_config: ModelConfig = mc
        # The pool is sized after the weights are in place: on a GPU it takes what is left.
        self.model = LlamaModel(
            mc,
            loaded.weights,
            device=device,
            dtype=dtype,
            attention=backend,
            block_size=config.block_size,
            max_positions=config.max_model_len,
            show_progress=show_progress,
        )
        cache_dtype = dtype if config.kv_dtype == "auto" else kv_dtype(config.kv_dtype)
        if cache_dtype == torch.float8_e4m3fn and backend.name == "triton":
            raise InvalidRequestError(
                "kv_dtype fp8_e4m3 runs on the sdpa and paged attention backends; the Triton "
                "kernels read 16-bit KV (use --attention-backend sdpa or paged, or "
                "--transfer-dtype fp8_e4m3 to send FP8 from a 16-bit cache)"
            )
        layout = KvLayout(
            mc.num_layers, mc.num_kv_heads, mc.head_dim, config.block_size, cache_dtype
        )
        export_layout = None
        if config.transfer_dtype not in ("auto", dtype_name(cache_dtype)):
            export_layout = layout.with_changes(dtype=kv_dtype(config.transfer_dtype))
        num_blocks = _size_pool(config, layout, device, export_layout)
        self.kv_cache = PagedKvCache(layout, num_blocks, device)
        self.exports = (
            None if export_layout is None else ExportPool(self.kv_cache, export_layout, num_blocks)
        )
        max_model_len = min(
            mc.max_position_embeddings,
            config.max_model_len or mc.max_position_embeddings,
            num_blocks * config.block_size,
        )
        self.runner = ModelRunner(
            self.model,
            self.kv_cache,
            cuda_graphs=config.cuda_graphs,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=max_model_len,
        )
        info = EngineInfo(
            engine="torch",
            model_id=config.model_id or loaded.model_id,
            block_size=config.block_size,
            num_blocks=num_blocks,
            layout_fingerprint=layout.fingerprint(),
            max_model_len=max_model_len,
            vocab_size=mc.vocab_size,
            device=str(device),
            dtype=dtype_name(dtype),
            kv_dtype=dtype_name(layout.dtype),
            attention_backend=backend.name,
            transfer_mode=TransferMode.MESH,
            cuda_graphs=self.runner.uses_cuda_graphs,
        )
        super().__init__(
            config,
            executor=self.runner,
            info=info,
            tokenizer=loaded.tokenizer,
            eos_token_ids=mc.eos_token_ids,
            exporter=self.exports,
        )


class TorchEngine(AsyncEngine):
    """The reference engine: `TorchCore` behind the async API, its KV pool open to NIXL."""

    def __init__(self, config: EngineConfig | None = None, *, show_progress: bool = True) -> None:
        self._torch_core = TorchCore(config or EngineConfig(), show_progress=show_progress)
        super().__init__(self._torch_core)

    @property
    def core(self) -> TorchCore:
        """The synchronous core, for tests and benchmarks; never touch it while running."""
        return self._torch_core

    def kv_region(self) -> PagedKvCache:
        """The KV tensor, for a transfer agent to register and to copy blocks in and out."""
        return self._torch_core.kv_cache

    def export_region(self) -> PagedKvCache:
        """The blocks exports name: the export pool's with `--transfer-dtype`, else the cache's."""
        exports = self._torch_core.exports
        return self._torch_core.kv_cache if exports is None else exports.cache


def _size_pool(
    config: EngineConfig, layout: KvLayout, device: torch.device, export: KvLayout | None
) -> int:
    """Blocks of the cache (and as many of the export pool, which shares the budget)."""
    if config.num_blocks is not None:
        return config.num_blocks
    if config.kv_cache_bytes is not None:
        budget = config.kv_cache_bytes
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * config.gpu_memory_fraction) - _GPU_ACTIVATION_RESERVE
    else:
        budget = _CPU_KV_CACHE_BYTES
    per_block = layout.bytes_per_block + (export.bytes_per_block if export else 0)
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise InvalidRequestError(
            f"no memory left for the KV cache ({budget} bytes, {per_block} per block)"
        )
    return int(num_blocks)
