"""The engine: a model over a paged KV cache, behind the `Engine` protocol services use."""

from kvmesh.engine.config import EngineConfig, ModelConfig
from kvmesh.engine.core import EngineCore
from kvmesh.engine.errors import (
    EngineError,
    EngineOverloadedError,
    EngineStoppedError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    UnknownRequestError,
)
from kvmesh.engine.protocol import Engine
from kvmesh.engine.sampling import SamplingParams, TokenLogprob
from kvmesh.engine.torch_engine import TorchEngine
from kvmesh.engine.types import (
    EngineInfo,
    EngineStats,
    FinishReason,
    GenerateRequest,
    KvExport,
    KvImportPlan,
    LoadSnapshot,
    PrefillOutput,
    TokenOutput,
    TransferMode,
)

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineCore",
    "EngineError",
    "EngineInfo",
    "EngineOverloadedError",
    "EngineStats",
    "EngineStoppedError",
    "FinishReason",
    "GenerateRequest",
    "InvalidRequestError",
    "KvExport",
    "KvImportPlan",
    "LoadSnapshot",
    "ModelConfig",
    "ModelLoadError",
    "ModelNotFoundError",
    "PrefillOutput",
    "SamplingParams",
    "TokenLogprob",
    "TokenOutput",
    "TorchEngine",
    "TransferMode",
    "UnknownRequestError",
]
