"""`tensorrt_llm.llmapi`: the LLM API's classes (the fake's)."""

from tensorrt_llm._engine import (
    LLM,
    CacheTransceiverConfig,
    CompletionOutput,
    KvCacheConfig,
    RequestOutput,
    SamplingParams,
)
from tensorrt_llm.disaggregated_params import DisaggregatedParams

__all__ = [
    "LLM",
    "CacheTransceiverConfig",
    "CompletionOutput",
    "DisaggregatedParams",
    "KvCacheConfig",
    "RequestOutput",
    "SamplingParams",
]
