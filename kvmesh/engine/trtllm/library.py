"""The TensorRT-LLM names the engine uses, imported only when an engine is built."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from kvmesh.errors import InvalidRequestError

RELEASE = "TensorRT-LLM 1.0"
MISSING = (
    f"engine trtllm needs the tensorrt_llm package ({RELEASE}, NVIDIA GPUs): "
    "pip install tensorrt_llm; it is not installed here"
)


class TrtllmMissingError(InvalidRequestError):
    """`--engine trtllm` on a machine without tensorrt_llm: the worker exits with one line."""


@dataclass(frozen=True, slots=True)
class Library:
    """`tensorrt_llm.LLM`, `SamplingParams` and the `tensorrt_llm.llmapi` configs."""

    LLM: Any
    SamplingParams: Any
    KvCacheConfig: Any
    CacheTransceiverConfig: Any
    DisaggregatedParams: Any
    version: str


def load() -> Library:
    """Import tensorrt_llm; TrtllmMissingError (INVALID_ARGUMENT) saying what to install."""
    try:
        root = importlib.import_module("tensorrt_llm")
        llmapi = importlib.import_module("tensorrt_llm.llmapi")
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] != "tensorrt_llm":
            raise TrtllmMissingError(
                f"engine trtllm could not import tensorrt_llm ({RELEASE}): it needs {e.name}: {e}"
            ) from e
        raise TrtllmMissingError(MISSING) from e
    return Library(
        LLM=root.LLM,
        SamplingParams=root.SamplingParams,
        KvCacheConfig=llmapi.KvCacheConfig,
        CacheTransceiverConfig=llmapi.CacheTransceiverConfig,
        DisaggregatedParams=llmapi.DisaggregatedParams,
        version=str(getattr(root, "__version__", "unknown")),
    )
