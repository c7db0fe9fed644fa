"""`SimCore` (an `EngineCore` over the sim executor) and `SimEngine` (registry name `sim`)."""

from __future__ import annotations

import uuid

from kvmesh import models
from kvmesh.engine.config import EngineConfig
from kvmesh.engine.core import EngineCore
from kvmesh.engine.driver import AsyncEngine
from kvmesh.engine.sim.executor import STATE_MAGIC, SimExecutor
from kvmesh.engine.sim.gpus import GPUS
from kvmesh.engine.sim.options import SimOptions
from kvmesh.engine.sim.timing import ModelShape, StepTimeModel
from kvmesh.errors import InvalidRequestError
from kvmesh.models import ModelConfig
from kvmesh.types import EngineInfo, TransferMode

_DTYPES = {"auto": "bfloat16", "bfloat16": "bfloat16", "float16": "float16"}


class SimCore(EngineCore):
    """An `EngineCore` whose executor only takes a GPU's time: real blocks, cache and events."""

    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        options = SimOptions.parse(config.options)
        if config.dtype not in _DTYPES:
            raise InvalidRequestError(
                f"the sim engine models 16-bit weights and KV; dtype {config.dtype!r} is not one"
            )
        dtype = _DTYPES[config.dtype]
        source = models.resolve(config.model)
        mc = models.read_model_config(source)
        self.model_config: ModelConfig = mc
        self.options = options
        shape = ModelShape.of(mc)
        timing = StepTimeModel(shape, GPUS[options.gpu], options.calibration())
        num_blocks = _size_pool(config, options, shape)
        max_model_len = min(
            mc.max_position_embeddings,
            config.max_model_len or mc.max_position_embeddings,
            num_blocks * config.block_size,
        )
        tokenizer = models.load_source_tokenizer(source)
        eos = set(mc.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        model_id = config.model_id or source.model_id
        self.sim_executor = SimExecutor(
            timing,
            options,
            seed=config.seed if options.seed is None else options.seed,
            vocab_size=mc.vocab_size,
            eos_token_ids=frozenset(eos),
            model_id=model_id,
            block_size=config.block_size,
            engine_id=uuid.uuid4().hex,
        )
        info = EngineInfo(
            engine="sim",
            model_id=model_id,
            block_size=config.block_size,
            num_blocks=num_blocks,
            layout_fingerprint=(
                f"{STATE_MAGIC}:L{mc.num_layers}:H{mc.num_kv_heads}:D{mc.head_dim}"
                f":B{config.block_size}:{dtype}"
            ),
            max_model_len=max_model_len,
            vocab_size=mc.vocab_size,
            device=f"sim:{options.gpu}",
            dtype=dtype,
            kv_dtype=dtype,
            attention_backend="sim",
            transfer_mode=TransferMode.ENGINE,
        )
        super().__init__(
            config,
            executor=self.sim_executor,
            info=info,
            tokenizer=tokenizer,
            eos_token_ids=eos,
        )

    @property
    def timing(self) -> StepTimeModel:
        return self.sim_executor.timing


class SimEngine(AsyncEngine):
    """The simulated engine behind the async API; it moves its own (imaginary) KV."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self._sim_core = SimCore(config or EngineConfig(engine="sim"))
        super().__init__(self._sim_core)

    @property
    def core(self) -> SimCore:
        """The synchronous core, for tests and benchmarks; never touch it while running."""
        return self._sim_core


def _size_pool(config: EngineConfig, options: SimOptions, shape: ModelShape) -> int:
    """`num_blocks=`, else `--num-blocks`, else `kv_cache_bytes`, else what the GPU's memory
    holds after the weights, times `mem_fraction`."""
    if options.num_blocks is not None:
        return options.num_blocks
    if config.num_blocks is not None:
        return config.num_blocks
    gpu = GPUS[options.gpu]
    if config.kv_cache_bytes is not None:
        budget = config.kv_cache_bytes
    else:
        budget = int((gpu.memory_bytes - shape.resident_bytes) * options.mem_fraction)
    num_blocks = budget // (shape.kv_bytes_per_token * config.block_size)
    if num_blocks < 1:
        raise InvalidRequestError(
            f"the model's weights ({shape.resident_bytes / 1e9:.1f} GB) leave no room for a KV "
            f"block on a {gpu.name} ({gpu.memory_bytes / 1e9:.0f} GB)"
        )
    return int(num_blocks)
