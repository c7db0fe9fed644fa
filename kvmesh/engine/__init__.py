"""The engine layer: the `Engine` protocol the worker runtime programs against, the registry
that finds engines by name, and the settings they share. Torch-free: importing it loads no
engine; `create_engine` loads the one a config names.

    protocol.Engine        the boundary (start/stop, requests, KV export/import, events, info)
    registry               built-ins (`torch`, `sim`, `trtllm`) and plug-ins (`kvmesh.engines`)
    core.EngineCore        scheduling, blocks, prefix cache, exports, events (torch-free)
    driver.AsyncEngine     a core on its own thread behind the async API
    torch_engine           the torch engine: model, attention backends, kernels, CUDA graphs
    sim                    the simulated engine: real bookkeeping, a GPU's timing, no tensors
    trtllm                 TensorRT-LLM's LLM API behind the protocol (needs tensorrt_llm)
"""

from kvmesh.engine.config import EngineConfig
from kvmesh.engine.protocol import Engine
from kvmesh.engine.registry import create_engine, engine_factory, engine_names

__all__ = ["Engine", "EngineConfig", "create_engine", "engine_factory", "engine_names"]
