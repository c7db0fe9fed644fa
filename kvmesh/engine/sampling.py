"""Sampling parameters, their validation, and the sampler.

Greedy when temperature is 0; otherwise temperature, then top-k, then top-p, then a draw from
the request's own generator (seeded per request, so a seed reproduces its tokens whatever else
shares the batch). Logprobs are those of the model's distribution before temperature and
truncation, as OpenAI's API reports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvmesh.engine.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # the chosen token's logprob
    top_logprobs: int = 0  # and the n most likely tokens'

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, *, vocab_size: int) -> None:
        """Checks that need no prompt; the engine adds context-length checks."""
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
            )
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must not be empty")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(
                f"stop_token_ids outside the vocabulary [0, {vocab_size}): {bad}"
            )


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(slots=True)
class SamplerRow:
    """One sequence's sampling state: its params and, when seeded, its own generator."""

    params: SamplingParams
    generator: torch.Generator | None = None


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.is_greedy or params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def sample(
    logits: torch.Tensor, rows: Sequence[SamplerRow]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Choose one token per row of `logits` ([B, vocab], float32)."""
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    greedy = [i for i, r in enumerate(rows) if r.params.is_greedy]
    if greedy:
        index = torch.tensor(greedy, device=logits.device)
        tokens[index] = logits[index].argmax(dim=-1)
    for i, row in enumerate(rows):
        if not row.params.is_greedy:
            tokens[i] = _draw(logits[i], row)
    token_list = tokens.tolist()
    return token_list, _logprobs(logits, token_list, rows)


def _draw(logits: torch.Tensor, row: SamplerRow) -> torch.Tensor:
    params = row.params
    scaled = logits / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_probs, order = scaled.softmax(dim=-1).sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the likeliest token always stays.
        keep_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs < params.top_p
        keep_sorted[0] = True
        keep = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)
        scaled = scaled.masked_fill(~keep, float("-inf"))
    probs = scaled.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=row.generator)[0]


def _logprobs(
    logits: torch.Tensor, tokens: list[int], rows: Sequence[SamplerRow]
) -> list[TokenLogprob | None]:
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs or r.params.top_logprobs]
    result: list[TokenLogprob | None] = [None] * len(rows)
    if not wanted:
        return result
    logp = torch.log_softmax(logits[wanted], dim=-1)
    for row_index, i in enumerate(wanted):
        top: tuple[tuple[int, float], ...] = ()
        n = rows[i].params.top_logprobs
        if n:
            values, ids = torch.topk(logp[row_index], n)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        result[i] = TokenLogprob(tokens[i], float(logp[row_index, tokens[i]]), top)
    return result
