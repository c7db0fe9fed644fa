"""The sampler: greedy when temperature is 0; otherwise temperature, then top-k, then top-p,
then a draw from the request's own generator (seeded per request, so a seed reproduces its
tokens whatever else shares the batch). Logprobs are those of the model's distribution before
temperature and truncation, as OpenAI's API reports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvmesh.sampling import SamplingParams, TokenLogprob


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
    if all(r.params.is_greedy and not _wants_logprobs(r) for r in rows):
        # The common case, kept to one kernel and one copy to the host: it is on every step.
        return logits.argmax(dim=-1).tolist(), [None] * len(rows)
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
    wanted = [i for i, r in enumerate(rows) if _wants_logprobs(r)]
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


def _wants_logprobs(row: SamplerRow) -> bool:
    return row.params.logprobs or row.params.top_logprobs > 0
