"""The records that cross the engine boundary: requests, streamed outputs, KV handles, load.

Torch-free: workers, the router and the edge share them without loading an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from kvmesh.sampling import SamplingParams, TokenLogprob


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled


class TransferMode(str, Enum):
    MESH = "mesh"  # the engine exposes its KV blocks; kvmesh's transfer agent moves them
    ENGINE = "engine"  # the engine moves KV itself; handles carry its opaque state


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    cache_salt: str = ""  # folded into the prompt's block hashes: hits only the same salt's


@dataclass(slots=True)
class TokenOutput:
    """New tokens of one request from one engine step (usually one token)."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: FinishReason | None
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens not computed here: prefix-cache hits or imported KV
    num_output_tokens: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class KvExport:
    """The KV of a prefilled prompt, pinned on the prefill side until released."""

    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int  # prompt tokens whose K/V the blocks hold
    block_size: int
    layout_fingerprint: str
    opaque: bytes = b""  # TransferMode.ENGINE: the engine's own transfer state


@dataclass(frozen=True, slots=True)
class PrefillOutput:
    first: TokenOutput  # the first generated token (may already finish the request)
    export: KvExport | None  # None when the first token finished the request


@dataclass(frozen=True, slots=True)
class KvImportPlan:
    """Local blocks reserved for an imported prompt's KV.

    Blocks `block_ids[:num_cached_blocks]` were already in this engine's prefix cache; the rest
    must be filled from the exporter's blocks at the same positions before decoding starts.
    """

    request_id: str
    block_ids: tuple[int, ...]
    num_cached_blocks: int
    num_tokens: int
    block_size: int
    layout_fingerprint: str
    filled_by_engine: bool = False  # TransferMode.ENGINE: the engine already moved the KV

    @property
    def blocks_to_fill(self) -> tuple[int, ...]:
        """The blocks kvmesh's transfer agent must fill (none when the engine moved the KV)."""
        return () if self.filled_by_engine else self.block_ids[self.num_cached_blocks :]


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    num_running: int
    num_waiting: int
    num_tokens_in_flight: int  # context tokens held by running and waiting requests
    num_prefill_tokens_pending: int  # tokens still to run through the model
    num_blocks_used: int
    num_blocks_total: int
    num_blocks_pinned: int  # held by exports and import reservations
    step_seconds: float  # duration of the last step


@dataclass(slots=True)
class EngineStats:
    """Monotonic counters since start."""

    num_computed_tokens: int = 0  # tokens run through the forward pass
    num_prompt_tokens: int = 0
    num_prefix_hit_tokens: int = 0  # tokens found in the prefix cache instead of computed
    num_imported_tokens: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    num_requests_finished: int = 0
    num_requests_aborted: int = 0
    num_requests_failed: int = 0  # failed a step on their own (the rest of the batch went on)
    # Speculative decoding: a verification is one sequence's drafts checked in one step.
    num_spec_verifications: int = 0
    num_spec_draft_tokens: int = 0  # drafts proposed and verified
    num_spec_accepted_tokens: int = 0  # drafts the model accepted

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted drafts over proposed ones (0 with none)."""
        return self.num_spec_accepted_tokens / max(self.num_spec_draft_tokens, 1)

    @property
    def spec_tokens_per_verification(self) -> float:
        """Tokens a verification emits: its accepted drafts plus the model's own (0 with none)."""
        if not self.num_spec_verifications:
            return 0.0
        return 1 + self.num_spec_accepted_tokens / self.num_spec_verifications


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What an engine is and can do: the worker registers it, routers pair tiers by it."""

    engine: str  # its registry name: "torch", "sim", a plug-in's
    model_id: str
    block_size: int
    num_blocks: int
    layout_fingerprint: str  # equal fingerprints: blocks copy byte for byte between engines
    max_model_len: int
    vocab_size: int
    device: str
    dtype: str  # weights and activations
    kv_dtype: str  # the KV cache's
    attention_backend: str
    transfer_mode: TransferMode
    cuda_graphs: bool = False
