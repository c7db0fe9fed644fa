"""The trtllm engine's own settings, from `--engine-arg KEY=VALUE` (`EngineConfig.options`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kvmesh.engine.config import parse_engine_args
from kvmesh.errors import InvalidRequestError

TRANSCEIVER_BACKENDS = ("DEFAULT", "UCX", "NIXL", "MPI")
LLM_BACKENDS = ("pytorch", "tensorrt")


@dataclass(frozen=True, slots=True)
class TrtllmOptions:
    backend: str = "pytorch"
    """`LLM(backend=...)`: `pytorch` (the 1.0 default path) or `tensorrt` (a built engine dir)."""
    cache_transceiver_backend: str = "UCX"
    """`CacheTransceiverConfig(backend=...)`: DEFAULT, UCX, NIXL or MPI."""
    max_tokens_in_buffer: int | None = None
    """`CacheTransceiverConfig(max_tokens_in_buffer=...)`; None: the library's default."""
    free_gpu_memory_fraction: float | None = None
    """`KvCacheConfig(free_gpu_memory_fraction=...)`; None: `--gpu-memory-fraction`."""
    event_buffer_max_size: int = 16384
    """`KvCacheConfig(event_buffer_max_size=...)`: KV events kept by the library; 0: none."""
    tensor_parallel_size: int = 1
    events_timeout_s: float = 1.0
    """How long one `get_kv_cache_events_async` / `get_stats_async` call waits for items."""
    vocab_size: int | None = None
    """The vocabulary, when the model's config.json cannot be read here (a hub name)."""

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> TrtllmOptions:
        """Read `--engine-arg` values; InvalidRequestError naming a bad or unknown key."""
        values = parse_engine_args("trtllm", options, _CONVERTERS)
        parsed = cls(**values)
        parsed._check()
        return parsed

    def _check(self) -> None:
        fraction = self.free_gpu_memory_fraction
        checks = [
            (self.backend in LLM_BACKENDS, f"backend must be one of {', '.join(LLM_BACKENDS)}"),
            (
                self.cache_transceiver_backend in TRANSCEIVER_BACKENDS,
                f"cache_transceiver_backend must be one of {', '.join(TRANSCEIVER_BACKENDS)}",
            ),
            (self.max_tokens_in_buffer is None or self.max_tokens_in_buffer >= 1, "buffer >= 1"),
            (fraction is None or 0 < fraction <= 1, "free_gpu_memory_fraction: (0, 1]"),
            (self.event_buffer_max_size >= 0, "event_buffer_max_size must be >= 0"),
            (self.tensor_parallel_size >= 1, "tensor_parallel_size must be >= 1"),
            (self.events_timeout_s > 0, "events_timeout_s must be positive"),
            (self.vocab_size is None or self.vocab_size >= 1, "vocab_size must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(f"trtllm engine option: {message}")


_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "backend": lambda text: text.strip().lower(),
    "cache_transceiver_backend": lambda text: text.strip().upper(),
    "max_tokens_in_buffer": int,
    "free_gpu_memory_fraction": float,
    "event_buffer_max_size": int,
    "tensor_parallel_size": int,
    "events_timeout_s": float,
    "vocab_size": int,
}
