"""The rules a request must meet, shared by the engine and the router (one set of messages)."""

from __future__ import annotations

from collections.abc import Sequence

from kvmesh.errors import InvalidRequestError
from kvmesh.sampling import SamplingParams


def validate_request(
    prompt: Sequence[int],
    sampling: SamplingParams,
    *,
    vocab_size: int,
    max_model_len: int,
    has_tokenizer: bool = True,
) -> None:
    """Raise InvalidRequestError, saying what is wrong, if the request can never be served."""
    if not prompt:
        raise InvalidRequestError("prompt is empty")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"prompt has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}"
        )
    n = len(prompt)
    if n >= max_model_len:
        raise InvalidRequestError(
            f"prompt has {n} tokens; the context holds {max_model_len} tokens including at least "
            "one output token"
        )
    sampling.validate(vocab_size=vocab_size)
    if n + sampling.max_tokens > max_model_len:
        raise InvalidRequestError(
            f"prompt ({n} tokens) + max_tokens ({sampling.max_tokens}) exceeds the context "
            f"of {max_model_len} tokens"
        )
    if sampling.stop and not has_tokenizer:
        raise InvalidRequestError("stop strings need a tokenizer; this model has none")
